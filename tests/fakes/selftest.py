#!/usr/bin/python3
"""End-to-end self-test of the fakes: fake_github.py and the fake runner in runner/.

Run: python3 tests/fakes/selftest.py [-k SUBSTRING] [-v]
Prints one line per test and finally `N passed, M failed`; exits 1 if anything failed.
Works as root (sets RUNNER_ALLOW_RUNASROOT=1) and as an unprivileged user. No fixed sleeps:
everything polls with a deadline.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
IS_ROOT = os.geteuid() == 0
TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ"
RUNNING_RE = r"^%s: Running job: (.+)$" % TS
COMPLETED_RE = r"^%s: Job (.+) completed with result: (\w+)$" % TS
VERBOSE = False


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def eq(actual, expected, what):
    if actual != expected:
        raise Failure("%s: expected %r, got %r" % (what, expected, actual))


def wait_until(fn, timeout, what, interval=0.02):
    end = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= end:
            raise Failure("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# --------------------------------------------------------------------------- fake GitHub
class Fake:
    def __init__(self, tmp):
        self.port_file = os.path.join(tmp, "fake.port")
        self.log = open(os.path.join(tmp, "fake.log"), "wb")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(HERE, "fake_github.py"), "--listen", "127.0.0.1:0",
             "--port-file", self.port_file],
            stdout=self.log, stderr=self.log, start_new_session=True)
        port = wait_until(lambda: self._port(), 10, "fake_github port file")
        self.base = "http://127.0.0.1:%d" % port

    def _port(self):
        check(self.proc.poll() is None, "fake_github exited early")
        try:
            with open(self.port_file) as f:
                text = f.read().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def call(self, method, path, body=None, token=None, auth=None, timeout=10):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", auth)
        elif token:
            req.add_header("Authorization", "Bearer " + token)
        req.add_header("Accept", "application/vnd.github+json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, headers, raw = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, e.headers, e.read()
        obj = json.loads(raw) if raw else None
        return status, headers, obj

    def ok(self, method, path, body=None, token=None, expect=(200, 201, 204)):
        status, _, obj = self.call(method, path, body, token)
        check(status in expect, "%s %s → %d %r" % (method, path, status, obj))
        return obj

    def reg_token(self, scope="repos/octo-org/octo-repo", kind="registration"):
        return self.ok("POST", "/%s/actions/runners/%s-token" % (scope, kind), token="ghp_admin")["token"]

    def runners(self):
        return self.ok("GET", "/_fake/runners")

    def runner(self, name):
        for r in self.runners():
            if r["name"] == name:
                return r
        return None

    def job(self, jid):
        return self.ok("GET", "/_fake/jobs/%d" % jid)

    def enqueue(self, name="build", steps="true", labels=("self-hosted",), scope="octo-org/octo-repo"):
        return self.ok("POST", "/_fake/jobs", {"scope": scope, "labels": list(labels), "name": name,
                                               "steps": steps})["id"]

    def wait_job(self, jid, status="completed", timeout=15):
        return wait_until(lambda: (lambda j: j if j["status"] == status else None)(self.job(jid)),
                          timeout, "job %d to be %s" % (jid, status))

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- processes
class Proc:
    """A child in its own session with stdout/stderr collected line by line."""

    live = []

    def __init__(self, argv, env, cwd):
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.out, self.err = [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self.threads:
            t.start()
        Proc.live.append(self)

    def _read(self, stream, sink):
        for raw in iter(stream.readline, b""):
            with self.lock:
                sink.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def pid(self):
        return self.proc.pid

    def lines(self, stream="out"):
        with self.lock:
            return list(self.out if stream == "out" else self.err)

    def find(self, pattern, stream="out"):
        rx = re.compile(pattern)
        return [m for m in (rx.search(line) for line in self.lines(stream)) if m]

    def wait_line(self, pattern, timeout=10, stream="out", count=1):
        def found():
            ms = self.find(pattern, stream)
            return ms[count - 1] if len(ms) >= count else None
        try:
            return wait_until(found, timeout, "%r on %s of %s" % (pattern, stream, self.argv[0]))
        except Failure as e:
            raise Failure("%s\n%s" % (e, self.dump()))

    def wait_exit(self, timeout=15):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Failure("%s did not exit within %ss\n%s" % (self.argv[0], timeout, self.dump()))
        self.exit_time = time.monotonic()
        # Output written before the exit is read at once; a left-behind grandchild (e.g. an
        # orphaned Worker) may keep the pipes open, so do not wait for EOF for long.
        end = time.monotonic() + 1.0
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        return rc

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def signal_group(self, sig):
        """Like Ctrl-C in a terminal: the signal goes to the whole process group."""
        os.killpg(self.proc.pid, sig)

    def dump(self):
        return "--- stdout:\n%s\n--- stderr:\n%s" % ("\n".join(self.lines("out")), "\n".join(self.lines("err")))

    def kill(self):
        if self.proc.poll() is None or True:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    @classmethod
    def kill_all(cls):
        for p in cls.live:
            p.kill()
        cls.live = []


def base_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACTIONS_RUNNER_", "RUNNER_", "FAKE_", "GITHUB_"))}
    env.update({
        "FAKE_RETRY_SLEEP_SEC": "0.1",
        "FAKE_SESSION_RETRY_SEC": "0.02",
        "FAKE_HTTP_RETRY_SEC": "0.02",
        "FAKE_POLL_WAIT_SEC": "0.5",
        "FAKE_CANCEL_SIGINT_WAIT_SEC": "2",
        "FAKE_CANCEL_SIGTERM_WAIT_SEC": "1",
    })
    if IS_ROOT:
        env["RUNNER_ALLOW_RUNASROOT"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Ctx:
    """Per-test context: the shared fake (reset) and fresh runner copies."""

    counter = 0

    def __init__(self, fake, tmp):
        self.fake, self.tmp = fake, tmp

    def runner_dir(self):
        Ctx.counter += 1
        dest = os.path.join(self.tmp, "runner%d" % Ctx.counter)
        shutil.copytree(os.path.join(HERE, "runner"), dest, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        return dest

    def url(self, scope="octo-org/octo-repo"):
        return "%s/%s" % (self.fake.base, scope)

    def sh(self, rdir, script, *args, env=None, timeout=30, stdin=None):
        p = subprocess.run([os.path.join(rdir, script)] + list(args), env=env or base_env(), cwd=rdir,
                           capture_output=True, timeout=timeout, input=stdin)
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    def configure(self, rdir, name, *extra, scope="octo-org/octo-repo", env=None):
        token = self.fake.reg_token(scope=("repos/" if "/" in scope else "orgs/") + scope)
        rc, out, err = self.sh(rdir, "config.sh", "--unattended", "--url", self.url(scope), "--token", token,
                               "--name", name, *extra, env=env)
        check(rc == 0, "config.sh failed rc=%d\n%s\n%s" % (rc, out, err))
        return out, err

    def start(self, rdir, *args, env=None, script="run.sh"):
        if script == "listener":
            argv = [os.path.join(rdir, "bin", "Runner.Listener"), "run"] + list(args)
        else:
            argv = [os.path.join(rdir, script)] + list(args)
        return Proc(argv, env or base_env(), rdir)


# =========================================================================== tests
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def rest_auth_errors_and_headers(c):
    f = c.fake
    path = "/repos/octo-org/octo-repo/actions/runners/registration-token"
    st, h, body = f.call("POST", path)
    eq((st, body["message"]), (401, "Requires authentication"), "no auth")
    st, h, body = f.call("POST", path, token="ghp_nope")
    eq((st, body["message"], body["status"]), (401, "Bad credentials", "401"), "bad token")
    st, h, body = f.call("POST", path, token="ghp_noadmin")
    eq((st, body["message"]), (403, "Must have admin rights to Repository."), "non-admin")
    st, h, body = f.call("POST", "/repos/octo-org/nope/actions/runners/registration-token", token="ghp_admin")
    eq((st, body["message"], body["status"]), (404, "Not Found", "404"), "unknown repo")
    check(body["documentation_url"].startswith("https://docs.github.com/"), "documentation_url")
    st, h, body = f.call("POST", "/orgs/nope/actions/runners/registration-token", token="ghp_admin")
    eq(st, 404, "unknown org")
    for auth in ("Bearer ghp_admin", "token ghp_admin",
                 "Basic " + base64.b64encode(b"github:ghp_admin").decode()):
        st, h, body = f.call("POST", "/api/v3/repos/Octo-Org/OCTO-REPO/actions/runners/registration-token", auth=auth)
        eq(st, 201, "registration-token with %s" % auth.split()[0])
        check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", body["expires_at"]), "expires_at format")
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-used", "x-ratelimit-reset",
                     "x-ratelimit-resource"):
            check(h.get(name), "header %s missing" % name)
    st, h, body = f.call("POST", "/orgs/octo-org/actions/runners/remove-token", token="ghp_admin")
    eq(st, 201, "org remove-token")
    st, h, body = f.call("GET", "/repos/octo-org/octo-repo/actions/runner-groups", token="ghp_admin")
    eq(st, 404, "no runner groups at repo scope")
    check(f.call("GET", "/enterprises/acme/actions/runners", token="ghp_admin")[0] == 404, "unknown enterprise")
    f.ok("POST", "/_fake/enterprises", {"slug": "acme"})
    eq(f.ok("GET", "/enterprises/acme/actions/runners", token="ghp_admin")["total_count"], 0, "enterprise list")
    f.ok("POST", "/_fake/pats", {"token": "ghp_new", "admin": False})
    eq(f.call("GET", "/orgs/octo-org/actions/runners", token="ghp_new")[0], 403, "added non-admin PAT")
    f.ok("POST", "/_fake/repos", {"full_name": "someone/thing"})
    eq(f.call("GET", "/repos/someone/thing/actions/runners", token="ghp_admin")[0], 200, "added repo")


@test
def jitconfig_pagination_labels_groups(c):
    f = c.fake
    gid = f.ok("POST", "/_fake/groups", {"org": "octo-org", "name": "gpu-pool"})["id"]
    check(gid > 1, "group id")
    groups = f.ok("GET", "/orgs/octo-org/actions/runner-groups", token="ghp_admin")
    eq([(g["id"], g["name"], g["default"]) for g in groups["runner_groups"]],
       [(1, "Default", True), (gid, "gpu-pool", False)], "runner groups")
    jit = "/orgs/octo-org/actions/runners/generate-jitconfig"
    st, _, body = f.call("POST", jit, {"name": "x", "labels": ["self-hosted"]}, token="ghp_admin")
    eq((st, body["message"]), (422, "Invalid input: object is missing required key: runner_group_id"), "jit 422")
    st, _, body = f.call("POST", jit, {"name": "x", "runner_group_id": 999, "labels": ["a"]}, token="ghp_admin")
    eq(st, 404, "jit unknown group")
    for i in range(5):
        body = f.ok("POST", jit, {"name": "jit-%d" % i, "runner_group_id": gid if i == 4 else 1,
                                  "labels": ["self-hosted", "X64", "gpu"]}, token="ghp_admin")
        eq((body["runner"]["status"], body["runner"]["os"], body["runner"]["busy"]), ("offline", "unknown", False),
           "new JIT runner")
        eq([(lb["name"], lb["type"]) for lb in body["runner"]["labels"]],
           [("self-hosted", "read-only"), ("X64", "read-only"), ("gpu", "custom")], "JIT labels")
    files = json.loads(base64.b64decode(body["encoded_jit_config"]))
    eq(sorted(files), [".credentials", ".credentials_rsaparams", ".runner"], "jit files")
    runner_file = json.loads(base64.b64decode(files[".runner"]))
    eq((runner_file["agentName"], runner_file["ephemeral"], runner_file["poolId"]), ("jit-4", True, gid), ".runner")
    st, _, body = f.call("POST", jit, {"name": "JIT-0", "runner_group_id": 1, "labels": ["a"]}, token="ghp_admin")
    eq(st, 409, "duplicate JIT name")
    st, h, page = f.call("GET", "/api/v3/orgs/octo-org/actions/runners?per_page=2", token="ghp_admin")
    eq((page["total_count"], len(page["runners"])), (5, 2), "page 1")
    check('rel="next"' in h["Link"] and 'rel="last"' in h["Link"] and "page=3" in h["Link"], "Link: %s" % h["Link"])
    check(h["Link"].startswith("<%s/api/v3/orgs/octo-org/actions/runners?" % f.base), "Link base: %s" % h["Link"])
    st, h, page = f.call("GET", "/orgs/octo-org/actions/runners?per_page=2&page=3", token="ghp_admin")
    eq(len(page["runners"]), 1, "last page size")
    check('rel="prev"' in h["Link"] and 'rel="first"' in h["Link"] and 'rel="next"' not in h["Link"], h["Link"])
    page = f.ok("GET", "/orgs/octo-org/actions/runners?name=jit-3", token="ghp_admin")
    eq([r["name"] for r in page["runners"]], ["jit-3"], "name filter")
    rid = page["runners"][0]["id"]
    labels = f.ok("GET", "/orgs/octo-org/actions/runners/%d/labels" % rid, token="ghp_admin")
    eq(labels["total_count"], 3, "labels total_count")
    eq(f.call("GET", "/repos/octo-org/octo-repo/actions/runners/%d" % rid, token="ghp_admin")[0], 404,
       "runner of another scope")
    in_group = f.ok("GET", "/orgs/octo-org/actions/runner-groups/%d/runners" % gid, token="ghp_admin")
    eq([r["name"] for r in in_group["runners"]], ["jit-4"], "runners of a group")
    eq(f.call("DELETE", "/orgs/octo-org/actions/runners/%d" % rid, token="ghp_admin")[0], 204, "delete idle")
    eq(f.call("DELETE", "/orgs/octo-org/actions/runners/%d" % rid, token="ghp_admin")[0], 404, "delete again")


@test
def faults_and_rate_limits(c):
    f = c.fake
    path = "/repos/octo-org/octo-repo/actions/runners"
    f.ok("POST", "/_fake/faults", {"kind": "rate_limit_primary", "count": 1, "path_contains": "/runners"})
    st, h, body = f.call("GET", path, token="ghp_admin")
    eq((st, h["x-ratelimit-remaining"]), (403, "0"), "primary")
    check(int(h["x-ratelimit-reset"]) <= int(time.time()) + 2, "reset soon")
    check(body["message"].startswith("API rate limit exceeded"), body["message"])
    f.ok("POST", "/_fake/faults", {"kind": "rate_limit_secondary", "count": 1, "method": "GET"})
    st, h, body = f.call("GET", path, token="ghp_admin")
    eq((st, h["retry-after"]), (403, "1"), "secondary")
    check(body["message"].startswith("You have exceeded a secondary rate limit."), body["message"])
    f.ok("POST", "/_fake/faults", {"kind": "status", "status": 502, "count": 2, "path_contains": "registration-token"})
    eq(f.call("GET", path, token="ghp_admin")[0], 200, "fault does not match other paths")
    for _ in range(2):
        eq(f.call("POST", path + "/registration-token", token="ghp_admin")[0], 502, "status fault")
    eq(f.call("POST", path + "/registration-token", token="ghp_admin")[0], 201, "fault used up")
    f.ok("POST", "/_fake/faults", {"kind": "slow", "delay_ms": 300, "count": 1})
    t0 = time.monotonic()
    eq(f.call("GET", path, token="ghp_admin")[0], 200, "slow")
    check(time.monotonic() - t0 >= 0.29, "slow fault did not delay")
    # slow_answer: the effect is there before the answer is.
    f.ok("POST", "/_fake/runners", {"scope": "octo-org/octo-repo", "name": "late-answer", "status": "online"})
    rid = next(r["id"] for r in f.ok("GET", "/_fake/runners") if r["name"] == "late-answer")
    f.ok("POST", "/_fake/faults", {"kind": "slow_answer", "delay_ms": 3000, "count": 1, "method": "DELETE"})
    answered = []
    t = threading.Thread(target=lambda: answered.append(f.call("DELETE", f"{path}/{rid}", token="ghp_admin")[0]))
    t.start()
    wait_until(lambda: all(r["name"] != "late-answer" for r in f.ok("GET", "/_fake/runners")), 2.5,
               "the runner gone before the DELETE is answered")
    check(not answered and t.is_alive(), "slow_answer answered at once")
    t.join()
    eq(answered, [204], "slow_answer's answer")
    log = f.ok("GET", "/_fake/requests")
    check({"method": "POST", "path": path + "/registration-token", "status": 502} in log, "request log")
    check(not any(e["path"].startswith("/_fake/faults") for e in log), "control requests are not logged")
    f.ok("POST", "/_fake/requests/clear")
    eq(f.ok("GET", "/_fake/requests"), [], "cleared log")


@test
def configure_token_errors(c):
    f, rdir = c.fake, c.runner_dir()
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", "BOGUS", "--name", "r1")
    eq(rc, 1, "rc with a bogus token")
    check("Self-hosted runner registration" in out and "# Authentication" in out, "banner:\n" + out)
    lines = err.splitlines()
    check(re.match(r"^Http response code: NotFound from 'POST %s/api/v3/actions/runner-registration' \(Request Id: .*\)$"
                   % re.escape(f.base), lines[0]), "first stderr line: %r" % lines[0])
    eq(lines[1], '{"message":"Not Found","documentation_url":"https://docs.github.com/rest"}', "404 body")
    eq(lines[2], "Response status code does not indicate success: 404 (Not Found).", "last line")
    check(not os.path.exists(os.path.join(rdir, ".runner")), "no .runner after failure")
    # An expired token (fake clock) and a remove token look exactly the same.
    token = f.reg_token()
    f.ok("POST", "/_fake/clock", {"advance_sec": 3601})
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", token)
    check(rc == 1 and "404 (Not Found)" in err, "expired token: %d %s" % (rc, err))
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(),
                        "--token", f.reg_token(kind="remove"))
    check(rc == 1 and "404 (Not Found)" in err, "remove token used to register: %d %s" % (rc, err))
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url("octo-org"), "--token", f.reg_token())
    check(rc == 1 and "404 (Not Found)" in err, "repo token for an org url: %d %s" % (rc, err))
    # A 5xx is retried (3 attempts in all), each attempt printing the Http line.
    f.ok("POST", "/_fake/faults", {"kind": "status", "status": 500, "count": 5, "path_contains": "runner-registration"})
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token())
    eq(rc, 1, "rc after 500s")
    eq(len(re.findall(r"^Http response code: InternalServerError ", err, re.M)), 3, "attempts:\n" + err)
    check("Response status code does not indicate success: 500 (Internal Server Error)." in err, err)
    f.ok("POST", "/_fake/faults/clear")
    f.ok("POST", "/_fake/faults", {"kind": "status", "status": 503, "count": 1, "path_contains": "runner-registration"})
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token(), "--name", "r1")
    eq(rc, 0, "one 503 then success:\n" + err)


@test
def configure_rules_and_files(c):
    f, rdir = c.fake, c.runner_dir()
    if IS_ROOT:
        env = base_env()
        del env["RUNNER_ALLOW_RUNASROOT"]
        rc, out, err = c.sh(rdir, "config.sh", "--version", env=env)
        eq((rc, out.strip()), (1, "Must not run with sudo"), "root check")
    rc, out, err = c.sh(rdir, "config.sh", "--version")
    eq((rc, out.strip()), (0, "2.336.0"), "--version")
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--token", "x")
    eq(rc, 1, "missing url")
    check("Invalid configuration provided for url. Terminating unattended configuration." in err, err)
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token(),
                        "--no-default-labels")
    eq(rc, 1, "--no-default-labels alone")
    check("Disabling default labels via --no-default-labels without specifying --labels is not supported" in err, err)
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token(),
                        "--runnergroup", "nope")
    eq(rc, 1, "unknown group")
    check('Could not find any self-hosted runner group named "nope".' in err, err)
    # Env equivalents, an unknown flag/arg warning, --name=value as an unknown flag.
    env = base_env(ACTIONS_RUNNER_INPUT_NAME="env-runner", ACTIONS_RUNNER_INPUT_LABELS="a,b,,A",
                   ACTIONS_RUNNER_INPUT_EPHEMERAL="true", ACTIONS_RUNNER_INPUT_DISABLEUPDATE="1",
                   ACTIONS_RUNNER_INPUT_NO_DEFAULT_LABELS="TRUE", ACTIONS_RUNNER_INPUT_WORK="wk")
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token(),
                        "--bogus", "x", "--color=red", env=env)
    eq(rc, 0, "configure with env inputs:\n" + err)
    eq(err.strip(), "Unrecognized command-line input arguments for command configure: 'bogus, color=red'. "
       "For usage refer to: .\\config.cmd --help or ./config.sh --help", "unknown args warning")
    for line in ("\u221a Connected to GitHub", "# Runner Registration", "\u221a Runner successfully added",
                 "# Runner settings", "\u221a Settings Saved."):
        check(line in out.splitlines(), "missing line %r in:\n%s" % (line, out))
    with open(os.path.join(rdir, ".runner")) as fh:
        text = fh.read()
    check(text.startswith('{\n  "agentId": '), "indented camelCase .runner:\n" + text)
    settings = json.loads(text)
    eq(list(settings)[:7], ["agentId", "agentName", "poolId", "poolName", "serverUrl", "gitHubUrl", "workFolder"],
       ".runner keys")
    eq((settings["agentName"], settings["workFolder"], settings.get("ephemeral"), settings.get("disableUpdate")),
       ("env-runner", "wk", True, None), ".runner values (DISABLEUPDATE=1 is not a bool)")
    eq(settings["gitHubUrl"], c.url(), "gitHubUrl")
    creds = json.load(open(os.path.join(rdir, ".credentials")))
    eq(creds["scheme"], "OAuth", ".credentials scheme")
    check(creds["data"]["clientId"], "clientId")
    eq(os.stat(os.path.join(rdir, ".credentials_rsaparams")).st_mode & 0o777, 0o600, "rsaparams mode")
    r = f.runner("env-runner")
    eq((r["labels"], r["ephemeral"], r["status"]), (["a", "b"], True, "offline"), "server-side runner")
    check(os.path.exists(os.path.join(rdir, ".env")) and os.path.exists(os.path.join(rdir, ".path")), ".env/.path")
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token())
    eq(rc, 1, "already configured")
    check("Cannot configure the runner because it is already configured. To reconfigure the runner, run "
          "'config.cmd remove' or './config.sh remove' first." in err, err)
    # --pat fetches the registration token itself (org scope this time).
    rdir2 = c.runner_dir()
    rc, out, err = c.sh(rdir2, "config.sh", "--unattended", "--url", c.url("octo-org"), "--pat", "ghp_admin",
                        "--name", "org-runner", "--labels", "x")
    eq(rc, 0, "--pat configure:\n" + err)
    eq(f.runner("org-runner")["scope"], "octo-org", "org scope")
    log = f.ok("GET", "/_fake/requests?path_contains=registration-token")
    check(any(e["path"] == "/api/v3/orgs/octo-org/actions/runners/registration-token" and e["status"] == 201
              for e in log), "PAT token fetch in log: %r" % log)
    rc, out, err = c.sh(c.runner_dir(), "config.sh", "--unattended", "--url", c.url(), "--pat", "ghp_noadmin")
    check(rc == 1 and "Http response code: Forbidden" in err and "Must have admin rights" in err, err)


@test
def name_conflict_and_replace(c):
    f = c.fake
    c.configure(c.runner_dir(), "dup")
    first = f.runner("dup")
    rdir = c.runner_dir()
    rc, out, err = c.sh(rdir, "config.sh", "--unattended", "--url", c.url(), "--token", f.reg_token(), "--name", "dup")
    eq(rc, 1, "conflict rc")
    check("A runner exists with the same name" in out.splitlines(), out)
    eq(err.strip(), "A runner exists with the same name dup.", "conflict stderr")
    out, err = c.configure(rdir, "dup", "--replace")
    lines = out.splitlines()
    check("A runner exists with the same name" in lines and "\u221a Successfully replaced the runner" in lines, out)
    eq(f.runner("dup")["id"], first["id"], "replace keeps the id")


@test
def job_lifecycle_busy_and_sigint(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "r1", "--labels", "gpu")
    run = c.start(rdir)
    run.wait_line(r"^%s: Listening for Jobs$" % TS)
    out = run.lines()
    eq(out[:4], ["", "\u221a Connected to GitHub", "", "Current runner version: '2.336.0'"], "startup lines")
    eq(f.runner("r1")["status"], "online", "online with a session")
    j1 = f.enqueue("build (ubuntu, 18)", labels=["self-hosted", "GPU"],
                   steps='echo "ws=$PWD repo=$GITHUB_REPOSITORY gha=$GITHUB_ACTIONS name=$RUNNER_NAME '
                         'job=$GITHUB_JOB track=${RUNNER_TRACKING_ID:+set}"')
    run.wait_line(COMPLETED_RE)
    m = run.find(RUNNING_RE)[0]
    eq(m.group(1), "build (ubuntu, 18)", "Running job name")
    m = run.find(COMPLETED_RE)[0]
    eq(m.groups(), ("build (ubuntu, 18)", "Succeeded"), "completed line")
    ws = os.path.join(rdir, "_work", "octo-repo", "octo-repo")
    check("ws=%s repo=octo-org/octo-repo gha=true name=r1 job=build (ubuntu, 18) track=set" % ws in run.lines(),
          "step environment:\n" + run.dump())
    j = f.wait_job(j1)
    eq((j["result"], j["runner_name"]), ("Succeeded", "r1"), "job record")
    j2 = f.enqueue("failing", steps="echo about to fail; false; echo not reached")
    run.wait_line(COMPLETED_RE, count=2)
    eq(run.find(COMPLETED_RE)[1].groups(), ("failing", "Failed"), "failed job")
    check("not reached" not in run.lines(), "bash -e")
    eq(f.wait_job(j2)["result"], "Failed", "failed job record")
    j3 = f.enqueue("needs-arm", labels=["self-hosted", "ARM64"])
    j4 = f.enqueue("long", steps="echo started-long; sleep 30")
    run.wait_line(r"^started-long$")
    eq(f.job(j3)["status"], "queued", "label mismatch stays queued")
    r = f.runner("r1")
    eq((r["busy"], r["status"]), (True, "online"), "busy during the job")
    rest = f.ok("GET", "/repos/octo-org/octo-repo/actions/runners/%d" % r["id"], token="ghp_admin")
    eq((rest["busy"], rest["status"], rest["os"]), (True, "online", "linux"), "REST runner")
    st, _, body = f.call("DELETE", "/repos/octo-org/octo-repo/actions/runners/%d" % r["id"], token="ghp_admin")
    eq((st, body["message"]), (422, 'Bad request - Runner "r1" is still running a job"'), "DELETE while busy")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--token", f.reg_token(kind="remove"))
    eq(rc, 1, "remove while busy")
    eq(err.splitlines()[:2], ["Failed: Removing runner from the server",
                              'Bad request - Runner "r1" is still running a job"'], "remove stderr")
    check(os.path.exists(os.path.join(rdir, ".runner")) and os.path.exists(os.path.join(rdir, ".credentials")),
          "files kept")
    listener = wait_until(lambda: find_pid(rdir, "Runner.Listener"), 5, "listener pid")
    t0 = time.monotonic()
    os.kill(listener, signal.SIGINT)
    rc = run.wait_exit(15)
    eq(rc, 0, "run.sh rc after SIGINT")
    check(time.monotonic() - t0 < 5, "SIGINT took too long")
    out = run.lines()
    check("Exiting..." in out, "Exiting... missing")
    eq(run.find(COMPLETED_RE)[-1].groups(), ("long", "Canceled"), "canceled line")
    eq(out[-2:], ["Runner listener exit with 0 return code, stop the service, no retry needed.", "Exiting runner..."],
       "run-helper/run.sh tail")
    eq(f.job(j4)["result"], "Canceled", "server-side Canceled")
    r = f.runner("r1")
    eq((r["busy"], r["status"], r["session"]), (False, "offline", False), "offline after SIGINT")
    logs = [n for n in os.listdir(os.path.join(rdir, "_diag")) if re.match(r"^Runner_\d{8}-\d{6}-utc\.log$", n)]
    check(logs, "no _diag/Runner_*.log")
    text = "".join(open(os.path.join(rdir, "_diag", n)).read() for n in logs)
    check("WRITE LINE: " in text and "Running job: long" in text, "diag content")
    # Idle remove: server side then local files.
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--token", f.reg_token(kind="remove"))
    eq(rc, 0, "remove idle:\n" + err)
    for line in ("# Runner removal", "\u221a Runner removed successfully", "\u221a Removed .credentials",
                 "\u221a Removed .runner"):
        check(line in out.splitlines(), "missing %r in:\n%s" % (line, out))
    check(not any(os.path.exists(os.path.join(rdir, n)) for n in (".runner", ".credentials", ".credentials_rsaparams")),
          "files removed")
    eq(f.runner("r1"), None, "runner deleted on the server")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--token", "x")
    eq(rc, 0, "remove unconfigured")
    for line in ("Cannot connect to server, because config files are missing. Skipping removing runner from the server.",
                 "Does not exist. Skipping Removing .credentials", "Does not exist. Skipping Removing .runner"):
        check(line in out.splitlines(), "missing %r in:\n%s" % (line, out))


def find_pid(rdir, name):
    """The pid of bin/<name> running from rdir (our own children only)."""
    target = os.path.join(rdir, "bin", name)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if any(a.decode(errors="replace") == target for a in argv[:2]):
            return int(pid)
    return None


@test
def remove_with_pat_and_local(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "rm1")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--pat", "ghp_admin", "--unattended")
    eq(rc, 0, "remove --pat:\n" + err)
    check("Unrecognized command-line input arguments for command remove: 'unattended'." in err, err)
    check("\u221a Runner removed successfully" in out, out)
    eq(f.runner("rm1"), None, "deleted")
    c.configure(rdir, "rm2")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--local")
    eq(rc, 0, "remove --local")
    check("\u221a Removed .runner" in out, out)
    check(f.runner("rm2") is not None, "--local does not touch the server")
    c.configure(rdir, "rm3")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--token", "BOGUS")
    eq(rc, 1, "remove with a bad token")
    check("Failed: Removing runner from the server" in err and os.path.exists(os.path.join(rdir, ".runner")), err)
    f.ok("DELETE", "/repos/octo-org/octo-repo/actions/runners/%d" % f.runner("rm3")["id"], token="ghp_admin")
    rc, out, err = c.sh(rdir, "config.sh", "remove", "--token", f.reg_token(kind="remove"))
    eq(rc, 0, "remove of a runner the server forgot")
    check("Does not exist. Skipping Removing runner from the server" in out.splitlines(), out)


@test
def trap_mode_sigterm_gives_143(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "trap")
    run = c.start(rdir, env=base_env(RUNNER_MANUALLY_TRAP_SIG="1"))
    run.wait_line("Listening for Jobs")
    jid = f.enqueue("long", steps="echo go; sleep 30")
    run.wait_line("^go$")
    run.signal(signal.SIGTERM)
    rc = run.wait_exit(15)
    eq(rc, 143, "run.sh exit status in trap mode")
    check("Exiting..." in run.lines(), "the trap sends SIGINT to the group")
    eq(run.find(COMPLETED_RE)[-1].groups(), ("long", "Canceled"), "canceled")
    # run.sh's first `wait` returns at once (143), so its line comes before run-helper's.
    out = run.lines()
    check(out.index("Exiting runner...") < out.index(
        "Runner listener exit with 0 return code, stop the service, no retry needed."), run.dump())
    eq(f.job(jid)["result"], "Canceled", "server result")


@test
def sigterm_exits_143_after_deadline(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "term")
    env = base_env(FAKE_SIGTERM_EXIT_SEC="0.5", FAKE_CANCEL_SIGINT_WAIT_SEC="20")
    run = c.start(rdir, env=env, script="listener")
    run.wait_line("Listening for Jobs")
    jid = f.enqueue("stubborn", steps="trap '' INT; echo go; sleep 30")
    run.wait_line("^go$")
    t0 = time.monotonic()
    run.signal(signal.SIGTERM)
    rc = run.wait_exit(10)
    elapsed = run.exit_time - t0
    eq(rc, 143, "Listener status after SIGTERM")
    check(0.4 <= elapsed < 3, "exit after the deadline, took %.2fs" % elapsed)
    check("Exiting..." not in run.lines(), "SIGTERM prints nothing")
    eq(f.job(jid)["status"], "in_progress", "job never reported")
    # The orphaned Worker is still cancelling; kill the whole session (the test's cleanup).
    run.kill()
    # Idle SIGTERM: clean and quick, still 143.
    f.ok("POST", "/_fake/jobs/%d/complete" % jid, {"result": "Failed"})
    f.ok("POST", "/_fake/runners/%d/kill-session" % f.runner("term")["id"])
    run = c.start(rdir, env=env, script="listener")
    run.wait_line("Listening for Jobs")
    run.signal(signal.SIGTERM)
    eq(run.wait_exit(5), 143, "idle SIGTERM")
    eq(f.runner("term")["session"], False, "session deleted")


@test
def cancel_escalation_and_ignored_sigint(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "esc")
    env = base_env(FAKE_CANCEL_SIGINT_WAIT_SEC="0.3", FAKE_CANCEL_SIGTERM_WAIT_SEC="0.3",
                   FAKE_LISTENER_IGNORE_SIGINT="1")
    run = c.start(rdir, env=env, script="listener")
    run.wait_line("Listening for Jobs")
    jid = f.enqueue("stubborn", steps="trap '' INT TERM; echo go; sleep 30")
    run.wait_line("^go$")
    run.signal(signal.SIGINT)  # ignored (FAKE_LISTENER_IGNORE_SIGINT)
    time_limit = time.monotonic() + 0.3
    while time.monotonic() < time_limit:  # poll: nothing may happen in the meantime
        check(run.proc.poll() is None and "Exiting..." not in run.lines(), "SIGINT was not ignored")
        time.sleep(0.02)
    t0 = time.monotonic()
    run.signal(signal.SIGTERM)
    eq(run.wait_exit(10), 143, "rc")
    elapsed = time.monotonic() - t0
    check(elapsed >= 0.55, "SIGINT→SIGTERM→SIGKILL escalation took only %.2fs" % elapsed)
    eq(run.find(COMPLETED_RE)[-1].groups(), ("stubborn", "Canceled"), "canceled after SIGKILL")
    eq(f.job(jid)["result"], "Canceled", "server result")


@test
def ephemeral_runner_one_job(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "eph", "--ephemeral", "--disableupdate")
    settings = json.load(open(os.path.join(rdir, ".runner")))
    eq((settings.get("ephemeral"), settings.get("disableUpdate")), (True, True), ".runner flags")
    run = c.start(rdir)
    run.wait_line("Listening for Jobs")
    j1 = f.enqueue("one")
    j2 = f.enqueue("two")
    eq(run.wait_exit(15), 0, "run.sh rc")
    out = run.lines()
    eq([m.groups() for m in run.find(COMPLETED_RE)], [("one", "Succeeded")], "exactly one job")
    i = out.index("\u221a Removed .credentials")
    eq(out[i + 1], "\u221a Removed .runner", "removal lines")
    check(not os.path.exists(os.path.join(rdir, ".runner")), ".runner deleted")
    eq(f.runner("eph"), None, "server removed the ephemeral runner")
    eq((f.job(j1)["result"], f.job(j2)["status"]), ("Succeeded", "queued"), "jobs")


@test
def jit_config_via_env(c):
    f, rdir = c.fake, c.runner_dir()
    body = f.ok("POST", "/repos/octo-org/octo-repo/actions/runners/generate-jitconfig",
                {"name": "jit1", "runner_group_id": 1, "labels": ["self-hosted", "jit"]}, token="ghp_admin")
    run = c.start(rdir, env=base_env(ACTIONS_RUNNER_INPUT_JITCONFIG=body["encoded_jit_config"]))
    run.wait_line("Listening for Jobs")
    eq((f.runner("jit1")["status"], f.runner("jit1")["os"]), ("online", "linux"), "JIT runner online")
    jid = f.enqueue("jit-job", labels=["jit"], steps='echo "input=${ACTIONS_RUNNER_INPUT_JITCONFIG:-unset}"')
    eq(run.wait_exit(15), 0, "rc")
    check("input=unset" in run.lines(), "the Listener must drop ACTIONS_RUNNER_INPUT_*:\n" + run.dump())
    eq(f.job(jid)["result"], "Succeeded", "job")
    eq(f.runner("jit1"), None, "JIT runner gone after its job")
    run = c.start(rdir, "--jitconfig", "!!notbase64!!", script="listener")
    eq(run.wait_exit(10), 1, "bad JIT config rc")
    check(run.lines("err"), "bad JIT config message")


@test
def session_conflict_gives_rc5(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "conf")
    first = c.start(rdir, script="listener")
    first.wait_line("Listening for Jobs")
    first.kill()  # SIGKILL: the session stays on the server
    eq(f.runner("conf")["session"], True, "stale session")
    run = c.start(rdir)
    eq(run.wait_exit(15), 0, "run.sh rc")
    err = run.lines("err")
    eq(err.count("A session for this runner already exists."), 8, "8 conflicts:\n" + run.dump())
    eq(err[-2:], ["Stop retry on SessionConflictException after retried for 240 seconds.",
                  "Failed to create session. A session for this runner already exists."], "final lines")
    check("Runner listener exit with Session Conflict error, stop the service, no retry needed." in run.lines(),
          run.dump())
    f.ok("POST", "/_fake/runners/%d/kill-session" % f.runner("conf")["id"])
    run = c.start(rdir, script="listener")
    run.wait_line("Listening for Jobs")
    # Killing a live session makes the Listener reconnect.
    f.ok("POST", "/_fake/runners/%d/kill-session" % f.runner("conf")["id"])
    run.wait_line(r"^%s: Runner reconnected\.$" % TS)
    run.signal(signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc")


@test
def deleted_runner_cleans_up(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "gone")
    run = c.start(rdir)
    run.wait_line("Listening for Jobs")
    f.ok("DELETE", "/repos/octo-org/octo-repo/actions/runners/%d" % f.runner("gone")["id"], token="ghp_admin")
    eq(run.wait_exit(10), 0, "rc")
    check("The runner no longer exists on the server. Cleaning up local configuration." in run.lines("err"), run.dump())
    check(not any(os.path.exists(os.path.join(rdir, n)) for n in (".runner", ".credentials", ".credentials_rsaparams")),
          "local config removed")
    run = c.start(rdir, script="listener")
    eq(run.wait_exit(10), 1, "not configured rc")
    eq(run.lines("err"), ["An error occurred: Not configured. Run config.(sh/cmd) to configure the runner."],
       "not configured text")
    # A stale .runner whose registration is gone: session creation fails, rc 1.
    c.configure(rdir, "stale")
    f.ok("DELETE", "/repos/octo-org/octo-repo/actions/runners/%d" % f.runner("stale")["id"], token="ghp_admin")
    run = c.start(rdir, script="listener")
    eq(run.wait_exit(10), 1, "stale registration rc")
    check(run.lines("err")[0].startswith("Failed to create a session. The runner registration has been deleted "
                                         "from the server, please re-configure."), run.dump())


@test
def deprecated_version(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "old")
    f.ok("POST", "/_fake/deprecate", {"below": "9.9.9"})
    msg = "An error occurred: Runner version v2.336.0 is deprecated and cannot receive messages."
    run = c.start(rdir, env=base_env(ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE="1"))
    eq(run.wait_exit(10), 7, "run.sh rc 7")
    check(msg in run.lines("err"), run.dump())
    eq(run.lines()[-2:], ["Runner listener exit with deprecated version exit code: 7.", "Exiting runner..."], "tail")
    run = c.start(rdir, env=base_env(ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE="true"), script="listener")
    eq(run.wait_exit(10), 7, "Listener accepts true")
    run = c.start(rdir, env=base_env(ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE="true"))
    eq(run.wait_exit(10), 0, "run.sh only passes 7 through for \"1\"")
    check("Exiting with unknown error code: 7" in run.lines(), run.dump())
    run = c.start(rdir, script="listener")
    eq(run.wait_exit(10), 1, "rc 1 without the env var")
    # Deprecation while connected is noticed on the next poll.
    f.ok("POST", "/_fake/deprecate", {"below": None})
    run = c.start(rdir, script="listener")
    run.wait_line("Listening for Jobs")
    f.ok("POST", "/_fake/deprecate", {"below": "2.337.0"})
    eq(run.wait_exit(10), 1, "deprecated while connected")


@test
def retryable_error_restarts(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "rc2")
    path = os.path.join(rdir, ".runner")
    settings = json.load(open(path))
    settings["serverUrl"] = "http://127.0.0.1:1/_fake/agent/"
    json.dump(settings, open(path, "w"), indent=2)
    run = c.start(rdir)
    run.wait_line(r"^Restarting runner\.\.\.$", count=2)
    check(run.find(r"^An error occurred: Connection refused \(127\.0\.0\.1:1\)$", "err"), run.dump())
    check("Runner listener exit with retryable error, re-launch runner in 5 seconds." in run.lines(), run.dump())
    run.kill()


@test
def hooks_and_orphans(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "hooks")
    hooks = os.path.join(c.tmp, "hooks")
    os.makedirs(hooks, exist_ok=True)
    started, completed, bad = (os.path.join(hooks, n) for n in ("started.sh", "completed.sh", "bad.sh"))
    with open(started, "w") as fh:
        fh.write('echo "hook-started $GITHUB_ACTIONS $GITHUB_REPOSITORY"\n')
    with open(completed, "w") as fh:
        fh.write('echo "hook-completed"\n')
    with open(bad, "w") as fh:
        fh.write('echo "hook-bad"\nfalse\necho "hook-not-reached"\n')
    env = base_env(ACTIONS_RUNNER_HOOK_JOB_STARTED=started, ACTIONS_RUNNER_HOOK_JOB_COMPLETED=completed,
                   FAKE_WORKER_ORPHANS="2", FAKE_WORKER_ORPHAN_SEC="0.2")
    run = c.start(rdir, env=env)
    run.wait_line("Listening for Jobs")
    f.enqueue("hooked", steps="echo step-ran")
    run.wait_line(COMPLETED_RE)
    out = run.lines()
    i = out.index("hook-started true octo-org/octo-repo")
    check(out[i + 1] == "step-ran" and out[i + 2] == "hook-completed", "hook order:\n" + run.dump())
    eq(run.find(COMPLETED_RE)[0].groups(), ("hooked", "Succeeded"), "result")
    run.signal_group(signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc after Ctrl-C")
    env["ACTIONS_RUNNER_HOOK_JOB_STARTED"] = bad
    run = c.start(rdir, env=env)
    run.wait_line("Listening for Jobs")
    f.enqueue("bad-hook", steps="echo step-ran")
    run.wait_line(COMPLETED_RE)
    out = run.lines()
    check("hook-bad" in out and "hook-not-reached" not in out and "step-ran" not in out, run.dump())
    check("hook-completed" in out, "completed hook runs after a failure")
    eq(run.find(COMPLETED_RE)[0].groups(), ("bad-hook", "Failed"), "started hook failure fails the job")
    run.signal_group(signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc after Ctrl-C")


@test
def print_log_to_stdout_duplicates(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "logs")
    run = c.start(rdir, env=base_env(ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT="1"))
    run.wait_line(r"^\[RUNNER %s INFO Terminal\] WRITE LINE: %s: Listening for Jobs$" % (TS, TS))
    f.enqueue("dup")
    run.wait_line(r"^\[RUNNER %s INFO Terminal\] WRITE LINE: %s: Job dup completed with result: Succeeded$" % (TS, TS))
    eq(len(run.find(COMPLETED_RE)), 1, "anchored regex matches once")
    eq(len(run.find(r"%s: Job dup completed with result" % TS)), 2, "unanchored matches twice")
    run.signal_group(signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc")


@test
def server_side_cancel_and_self_update(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "upd")
    run = c.start(rdir)
    run.wait_line("Listening for Jobs")
    jid = f.enqueue("cancel-me", steps="echo go; sleep 30")
    run.wait_line("^go$")
    f.ok("POST", "/_fake/jobs/%d/cancel" % jid)
    run.wait_line(COMPLETED_RE)
    eq(run.find(COMPLETED_RE)[0].groups(), ("cancel-me", "Canceled"), "server-side cancel")
    eq(f.wait_job(jid)["result"], "Canceled", "job record")
    check(run.proc.poll() is None, "the Listener keeps running after a server-side cancel")
    f.ok("POST", "/_fake/runners/%d/update" % f.runner("upd")["id"], {"version": "2.337.0"})
    run.wait_line(r"^Update finished successfully\.$")
    run.wait_line("Listening for Jobs", count=2)
    out = run.lines()
    for line in ("Runner update in progress, do not shutdown runner.", "Downloading 2.337.0 runner",
                 "Runner will exit shortly for update, should be back online within 10 seconds.",
                 "Runner listener exit because of updating, re-launch runner after successful update",
                 "Restarting runner..."):
        check(line in out, "missing %r:\n%s" % (line, run.dump()))
    check(not os.path.exists(os.path.join(rdir, "update.finished")), "update.finished consumed")
    check(os.path.exists(os.path.join(rdir, "_work", "_update.sh")), "_update.sh written")
    os.kill(wait_until(lambda: find_pid(rdir, "Runner.Listener"), 5, "listener pid"), signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc")


@test
def sigint_idle_and_job_race_release(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "idle")
    run = c.start(rdir, script="listener", env=base_env(FAKE_POLL_WAIT_SEC="2"))
    run.wait_line("Listening for Jobs")
    t0 = time.monotonic()
    run.signal(signal.SIGINT)
    eq(run.wait_exit(10), 0, "idle SIGINT rc")
    check(run.exit_time - t0 < 1.0, "idle shutdown must not wait for the 2 s poll: %.2fs" % (run.exit_time - t0))
    eq(run.lines()[-1], "Exiting...", "Exiting... printed")
    eq(f.runner("idle")["session"], False, "session deleted")
    jid = f.enqueue("later")
    eq(f.job(jid)["status"], "queued", "job stays queued with the runner offline")


@test
def run_helper_root_check_and_once(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "once")
    if IS_ROOT:
        for trap, want in (("", 0), ("1", 1)):
            env = base_env(RUNNER_MANUALLY_TRAP_SIG=trap)
            del env["RUNNER_ALLOW_RUNASROOT"]
            run = c.start(rdir, env=env)
            eq(run.wait_exit(10), want, "run.sh rc for root without RUNNER_ALLOW_RUNASROOT (trap=%r)" % trap)
            eq(run.lines(), ["Must not run interactively with sudo", "Exiting runner..."], "root check lines")
    run = c.start(rdir, "--once")
    run.wait_line("Listening for Jobs")
    check(run.find(r"^Warning: '--once' is going to be deprecated"), run.dump())
    f.enqueue("only")
    f.enqueue("never")
    eq(run.wait_exit(10), 0, "--once rc")
    eq([m.group(1) for m in run.find(RUNNING_RE)], ["only"], "one job with --once")
    check(os.path.exists(os.path.join(rdir, ".runner")), "--once keeps the config")


@test
def stop_on_completed_line_beats_next_assignment(c):
    f, rdir = c.fake, c.runner_dir()
    c.configure(rdir, "race")
    gate = os.path.join(c.tmp, "race.release")
    run = c.start(rdir, script="listener")
    run.wait_line("Listening for Jobs")
    j1 = f.enqueue("first", steps="echo go; while [ ! -e %s ]; do sleep 0.02; done" % gate)
    run.wait_line("^go$")
    j2 = f.enqueue("second")
    open(gate, "w").close()
    run.wait_line(COMPLETED_RE, timeout=10)
    run.signal(signal.SIGINT)  # what a draining supervisor does on the "completed" line
    eq(run.wait_exit(10), 0, "rc")
    eq((f.job(j1)["result"], f.job(j2)["status"]), ("Succeeded", "queued"), "second job not taken")
    eq(f.ok("GET", "/_fake/config"), {"assign_cooldown_ms": 500, "assign_on_complete": False}, "default cooldown")
    f.ok("POST", "/_fake/config", {"assign_cooldown_ms": 0})
    run = c.start(rdir, script="listener")
    eq(f.wait_job(j2)["result"], "Succeeded", "picked up by the next Listener")
    run.signal(signal.SIGINT)
    eq(run.wait_exit(10), 0, "rc")


@test
def instant_assignment_report_first_and_labels_stripped(c):
    """The window a drain must close: with the real order (report, poll, print) and an instant
    assignment, a SIGINT on the `completed` line cancels a job the Listener already received;
    with the runner's custom labels removed first, no job that asks for them is assigned."""
    f = c.fake
    f.ok("POST", "/_fake/config", {"assign_cooldown_ms": 0, "assign_on_complete": True})
    env = base_env(FAKE_LISTENER_REPORT_FIRST="1")
    for strip in (False, True):
        rdir = c.runner_dir()
        c.configure(rdir, "instant-%d" % strip, "--labels", "pool", env=env)
        rid = [r for r in f.ok("GET", "/_fake/runners") if r["name"] == "instant-%d" % strip][0]["id"]
        gate = os.path.join(c.tmp, "instant-%d.release" % strip)
        run = c.start(rdir, script="listener", env=env)
        run.wait_line("Listening for Jobs")
        j1 = f.enqueue("first", labels=("pool",), steps="echo go; while [ ! -e %s ]; do sleep 0.02; done" % gate)
        run.wait_line("^go$")
        # Long enough that only a cancel ends it (a quick one could finish before the SIGINT).
        j2 = f.enqueue("second", labels=("pool",), steps="sleep 30")
        if strip:
            left = f.ok("DELETE", "/repos/octo-org/octo-repo/actions/runners/%d/labels" % rid, token="ghp_admin")
            eq(sorted(lb["name"] for lb in left["labels"]), ["Linux", "X64", "self-hosted"], "read-only labels stay")
            check(all(lb["type"] == "read-only" for lb in left["labels"]), "only read-only labels left")
        open(gate, "w").close()
        run.wait_line(COMPLETED_RE, timeout=10)
        if not strip:
            # Assigned within the completion report, before the line was printed.
            eq(f.job(j2)["status"], "in_progress", "instant assignment")
        run.signal(signal.SIGINT)
        eq(run.wait_exit(15), 0, "rc")
        eq(f.job(j1)["result"], "Succeeded", "first job")
        if strip:
            eq(f.job(j2)["status"], "queued", "a stripped runner got a job asking for its old label")
        else:
            eq(f.wait_job(j2)["result"], "Canceled", "a received job is cancelled by SIGINT")
            run.wait_line("Running job: second")


@test
def drain_sentinel_stops_the_message_loop(c):
    f, rdir = c.fake, c.runner_dir()
    env = base_env(FAKE_LISTENER_DRAIN_SENTINEL="1")
    c.configure(rdir, "sentinel", env=env)
    run = c.start(rdir, script="listener", env=env)
    run.wait_line("Listening for Jobs")
    open(os.path.join(rdir, ".drain"), "w").close()
    eq(run.wait_exit(10), 0, "rc after the sentinel")
    j = f.enqueue("after")
    eq(f.job(j)["status"], "queued", "no job after the sentinel")


@test
def github_app_jwt_installations_and_tokens(c):
    sys.path.insert(0, HERE)
    import fake_github as fg
    key = os.path.join(c.tmp, "app.pem")
    pub = os.path.join(c.tmp, "app.pub.pem")
    for argv in (["openssl", "genrsa", "-traditional", "-out", key, "2048"],
                 ["openssl", "rsa", "-in", key, "-pubout", "-out", pub]):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(key) as fh:
        lines = fh.read().strip().splitlines()
    _, body, _ = fg.der_read(base64.b64decode("".join(lines[1:-1])), 0)
    _, n, _, d = fg.der_ints(body)[:4]

    def b64url(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def jwt(iss=7, iat_off=-60, exp_off=540, tamper=False):
        now = int(time.time())
        signing = "%s.%s" % (b64url(b'{"alg":"RS256","typ":"JWT"}'),
                             b64url(json.dumps({"iat": now + iat_off, "exp": now + exp_off, "iss": iss}).encode()))
        k = (n.bit_length() + 7) // 8
        t = fg.SHA256_DIGEST_INFO + fg.hashlib.sha256(signing.encode()).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        sig = pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")
        if tamper:
            sig = sig[:-1] + bytes([sig[-1] ^ 1])
        return "%s.%s" % (signing, b64url(sig))

    f = c.fake
    with open(pub) as fh:
        eq(f.ok("POST", "/_fake/apps", {"app_id": 7, "public_key_pem": fh.read()})["key_bits"], 2048, "app key")
    repo_inst = f.ok("POST", "/_fake/installations", {"app_id": 7, "account": "octo-org/octo-repo"})["id"]
    st, _, body = f.call("GET", "/api/v3/repos/Octo-Org/octo-repo/installation", token=jwt())
    eq((st, body["id"], body["app_id"], body["repository_selection"]), (200, repo_inst, 7, "selected"), "repo install")
    # Installed on the owner with one repository selected: the org lookup finds it too.
    eq(f.ok("GET", "/orgs/octo-org/installation", token=jwt())["id"], repo_inst, "the owner's installation")
    eq(f.call("GET", "/orgs/nope/installation", token=jwt())[0], 404, "not installed there")
    st, _, body = f.call("POST", "/_fake/installations", {"app_id": 7, "account": "octo-org"})
    eq(st, 422, "one installation per account")
    for bad, msg in ((jwt(tamper=True), fg.JWT_DECODE_MSG),
                     (jwt(exp_off=660), "'Expiration time' claim ('exp') is too far in the future"),
                     (jwt(iat_off=-700, exp_off=-10), "'Expiration time' claim ('exp') must be a numeric value "
                                                      "representing the future time at which the assertion expires"),
                     (jwt(iss=8), "Integration not found"),
                     ("ghp_admin", fg.JWT_DECODE_MSG)):
        st, _, body = f.call("GET", "/repos/octo-org/octo-repo/installation", token=bad)
        eq((st, body["message"]), (401, msg), "bad JWT")
    st, h, body = f.call("POST", "/app/installations/%d/access_tokens" % repo_inst, token=jwt())
    eq(st, 201, "access token")
    token = body["token"]
    check(token.startswith("ghs_") and re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", body["expires_at"]),
          "token shape %r" % body)
    eq(f.call("POST", "/app/installations/999/access_tokens", token=jwt())[0], 404, "unknown installation")
    # The token works like an admin PAT on its own repository only.
    eq(f.call("POST", "/repos/octo-org/octo-repo/actions/runners/registration-token", token=token)[0], 201, "repo")
    st, _, body = f.call("POST", "/orgs/octo-org/actions/runners/registration-token", token=token)
    eq((st, body["message"]), (403, fg.INTEGRATION_MSG), "org with a repo installation")
    f.ok("POST", "/_fake/repos", {"full_name": "octo-org/other"})
    eq(f.call("GET", "/repos/octo-org/other/actions/runners", token=token)[0], 404, "a repo not selected")
    eq(f.call("GET", "/app/installations", token=token)[0], 401, "installation token is no JWT")
    # An org installation: org runners, and all its repos; read-only permission refuses POST.
    f.ok("POST", "/_fake/orgs", {"login": "other-org"})
    f.ok("POST", "/_fake/repos", {"full_name": "other-org/tool"})
    org_inst = f.ok("POST", "/_fake/installations", {"app_id": 7, "account": "other-org", "id": 4242})["id"]
    eq(org_inst, 4242, "given id")
    eq(f.ok("GET", "/orgs/other-org/installation", token=jwt())["id"], 4242, "org install")
    eq(f.ok("GET", "/repos/other-org/tool/installation", token=jwt())["id"], 4242, "its repos")
    org_token = f.ok("POST", "/app/installations/4242/access_tokens", token=jwt())["token"]
    eq(f.call("GET", "/orgs/other-org/actions/runner-groups", token=org_token)[0], 200, "org groups")
    eq(f.call("POST", "/repos/other-org/tool/actions/runners/registration-token", token=org_token)[0], 201, "repo")
    eq(f.call("GET", "/orgs/octo-org/actions/runners", token=org_token)[0], 403, "another org")
    f.ok("POST", "/_fake/enterprises", {"slug": "acme"})
    st, _, body = f.call("GET", "/enterprises/acme/actions/runners", token=org_token)
    eq((st, body["message"]), (403, fg.INTEGRATION_MSG), "no App tokens on enterprise endpoints")
    f.ok("POST", "/_fake/repos", {"full_name": "ro-org/x"})
    ro = f.ok("POST", "/_fake/installations", {"app_id": 7, "account": "ro-org/x",
                                               "permissions": {"administration": "read"}})["id"]
    ro_token = f.ok("POST", "/app/installations/%d/access_tokens" % ro, token=jwt())["token"]
    eq(f.call("GET", "/repos/ro-org/x/actions/runners", token=ro_token)[0], 200, "read")
    eq(f.call("POST", "/repos/ro-org/x/actions/runners/registration-token", token=ro_token)[0], 403, "write")
    # Expiry on the fake clock (the JWT still checks against real time); Date follows it.
    f.ok("POST", "/_fake/clock", {"advance_sec": 3601})
    st, h, body = f.call("GET", "/repos/octo-org/octo-repo/actions/runners", token=token)
    eq((st, body["message"]), (401, "Bad credentials"), "expired installation token")
    from email.utils import parsedate_to_datetime
    skew = parsedate_to_datetime(h["Date"]).timestamp() - time.time()
    check(3590 < skew < 3610, "Date follows the fake clock (%.0f s ahead)" % skew)
    f.ok("POST", "/_fake/apps/token_ttl", {"seconds": 5})
    body = f.ok("POST", "/app/installations/%d/access_tokens" % repo_inst, token=jwt())
    eq(f.call("GET", "/repos/octo-org/octo-repo/actions/runners", token=body["token"])[0], 200, "fresh token")
    f.ok("POST", "/_fake/clock", {"advance_sec": 6})
    eq(f.call("GET", "/repos/octo-org/octo-repo/actions/runners", token=body["token"])[0], 401, "short TTL")
    log = f.ok("GET", "/_fake/requests?path_contains=/actions/runners")
    check(all("ghs_" not in json.dumps(e) for e in log), "token values in the request log")
    eq([e.get("auth") for e in log if e["status"] == 401][-1], "ghs#4", "log names the token by serial")
    check(any(e.get("auth") == "jwt:7" for e in f.ok("GET", "/_fake/requests?path_contains=installation")), "jwt in log")


# =========================================================================== main
class Receiver:
    """A webhook receiver on loopback: records each delivery (headers, body); answers 200."""

    def __init__(self):
        import http.server
        got = self.got = []
        lock = self.lock = threading.Lock()

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/webhook" % self.server.server_address[1]

    def actions(self):
        with self.lock:
            return [(json.loads(b)["action"], json.loads(b)["workflow_job"]["id"]) for _, b in self.got]

    def stop(self):
        self.server.shutdown()


@test
def hooks_rest_create_update_and_secret_hidden(c):
    f = c.fake
    base = "/repos/octo-org/octo-repo/hooks"
    eq(f.ok("GET", base, token="ghp_admin"), [], "no hooks at first")
    eq(f.call("GET", base, token="ghp_noadmin")[0], 403, "hooks need admin")
    cfg = {"url": "http://127.0.0.1:9/webhook", "content_type": "json", "secret": "s1", "insecure_ssl": "0"}
    h = f.ok("POST", base, {"name": "web", "active": True, "events": ["workflow_job"], "config": cfg},
             token="ghp_admin")
    eq((h["config"]["secret"], h["events"], h["active"]), ("********", ["workflow_job"], True), "created hook")
    st, _, body = f.call("POST", base, {"config": cfg}, token="ghp_admin")
    eq(st, 422, "same URL twice")
    f.ok("PATCH", "%s/%d" % (base, h["id"]), {"config": dict(cfg, secret="s2"), "events": ["workflow_job"]},
         token="ghp_admin")
    eq([x["config"]["secret"] for x in f.ok("GET", "/_fake/hooks")], ["s2"], "secret updated (control view)")
    eq(len(f.ok("GET", "/orgs/octo-org/hooks", token="ghp_admin")), 0, "org hooks are separate")
    f.ok("POST", "/orgs/octo-org/hooks", {"events": ["workflow_job"], "config": dict(cfg, url="http://x/y")},
         token="ghp_admin")
    eq(len(f.ok("GET", "/orgs/octo-org/hooks", token="ghp_admin")), 1, "org hook")
    eq(f.call("PATCH", "/orgs/octo-org/hooks/999", {}, token="ghp_admin")[0], 404, "unknown hook")


@test
def workflow_job_webhooks_are_signed_and_follow_the_job(c):
    import hmac as _hmac, hashlib as _hashlib
    f, rdir = c.fake, c.runner_dir()
    rx = Receiver()
    try:
        f.ok("POST", "/_fake/hooks", {"scope": "octo-org/octo-repo", "url": rx.url, "secret": "topsecret"})
        jid = f.enqueue("hooked", labels=["self-hosted", "jit"])
        wait_until(lambda: ("queued", jid) in rx.actions(), 10, "the queued delivery")
        headers, body = rx.got[0]
        want = "sha256=" + _hmac.new(b"topsecret", body, _hashlib.sha256).hexdigest()
        eq((headers.get("x-github-event"), headers.get("x-hub-signature-256")), ("workflow_job", want), "signed")
        payload = json.loads(body)
        eq((payload["workflow_job"]["labels"], payload["repository"]["full_name"]),
           (["self-hosted", "jit"], "octo-org/octo-repo"), "payload")
        jit = f.ok("POST", "/repos/octo-org/octo-repo/actions/runners/generate-jitconfig",
                   {"name": "hooked-1", "runner_group_id": 1, "labels": ["self-hosted", "jit"]}, token="ghp_admin")
        run = c.start(rdir, env=base_env(ACTIONS_RUNNER_INPUT_JITCONFIG=jit["encoded_jit_config"]))
        eq(run.wait_exit(15), 0, "rc")
        wait_until(lambda: ("completed", jid) in rx.actions(), 10, "the completed delivery")
        eq(rx.actions(), [("queued", jid), ("in_progress", jid), ("completed", jid)], "delivery order")
        done = json.loads(rx.got[2][1])["workflow_job"]
        eq((done["runner_name"], done["conclusion"]), ("hooked-1", "success"), "completed names the runner")
        # GitHub-hosted and other scopes' jobs go to no repository hook of this one.
        f.ok("POST", "/_fake/repos", {"full_name": "octo-org/other"})
        f.enqueue("elsewhere", scope="octo-org/other")
        # Redelivery: the same delivery id and body again.
        d = f.ok("GET", "/_fake/deliveries")[0]
        eq((d["status"], d["action"]), (200, "queued"), "delivery log")
        f.ok("POST", "/_fake/deliveries/redeliver", {"id": d["id"]}, expect=(202,))
        wait_until(lambda: len(rx.got) == 4, 10, "the redelivery")
        eq((rx.got[3][0].get("x-github-delivery"), rx.got[3][1]), (d["id"], body), "same delivery again")
        # A cancelled queued job is `completed` without a runner.
        j2 = f.enqueue("cancelled", labels=["self-hosted"])
        f.ok("POST", "/_fake/jobs/%d/cancel" % j2)
        wait_until(lambda: ("completed", j2) in rx.actions(), 10, "the cancelled job's delivery")
        eq(json.loads(rx.got[-1][1])["workflow_job"]["runner_name"], None, "no runner for a cancelled job")
    finally:
        rx.stop()


@test
def form_deliveries_drops_approvals_and_queued_runs_listing(c):
    import hmac as _hmac, hashlib as _hashlib
    from urllib.parse import parse_qs as _parse_qs
    f = c.fake
    rx = Receiver()
    try:
        f.ok("POST", "/_fake/hooks", {"scope": "octo-org/octo-repo", "url": rx.url, "secret": "s",
                                      "content_type": "form"})
        jid = f.enqueue("formed", labels=["self-hosted", "x"])
        wait_until(lambda: len(rx.got) == 1, 10, "the form-encoded delivery")
        headers, body = rx.got[0]
        eq(headers.get("content-type"), "application/x-www-form-urlencoded", "content type")
        want = "sha256=" + _hmac.new(b"s", body, _hashlib.sha256).hexdigest()
        eq(headers.get("x-hub-signature-256"), want, "signed over the form body as sent")
        payload = json.loads(_parse_qs(body.decode())["payload"][0])
        eq((payload["action"], payload["workflow_job"]["id"]), ("queued", jid), "payload field")
        # A dropped delivery: logged with an error, never sent.
        f.ok("POST", "/_fake/deliveries/drop", {"count": 1, "action": "queued"})
        lost = f.enqueue("lost", labels=["self-hosted", "x"])
        sent = f.enqueue("sent", labels=["self-hosted", "x"])
        wait_until(lambda: len(rx.got) == 2, 10, "the delivery after the dropped one")
        log = {d["job_id"]: d for d in f.ok("GET", "/_fake/deliveries")}
        eq((log[lost]["status"], log[lost]["error"]), (None, "dropped by the fake"), "dropped delivery logged")
        eq(json.loads(_parse_qs(rx.got[1][1].decode())["payload"][0])["workflow_job"]["id"], sent, "next one sent")
        # Held for approval: `waiting`, then `queued` with status waiting; approve → `queued`.
        held = f.ok("POST", "/_fake/jobs", {"labels": ["self-hosted", "x"], "name": "held", "waiting": True})["id"]
        wait_until(lambda: len(rx.got) == 4, 10, "the waiting deliveries")
        got = [json.loads(_parse_qs(b.decode())["payload"][0]) for _, b in rx.got[2:4]]
        eq([(p["action"], p["workflow_job"]["status"]) for p in got], [("waiting", "waiting"), ("queued", "waiting")],
           "held job's deliveries")
        eq(f.call("POST", "/_fake/jobs/%d/approve" % jid)[0], 422, "only a waiting job is approved")
        # The REST listing: queued and waiting runs, their jobs.
        runs = f.ok("GET", "/repos/octo-org/octo-repo/actions/runs?status=queued&per_page=100", token="ghp_admin")
        eq(sorted(r["id"] for r in runs["workflow_runs"]), sorted(100000 + j for j in (jid, lost, sent)), "queued runs")
        eq(runs["total_count"], 3, "total_count")
        waiting = f.ok("GET", "/repos/octo-org/octo-repo/actions/runs?status=waiting", token="ghp_admin")
        eq([r["id"] for r in waiting["workflow_runs"]], [100000 + held], "waiting run")
        jobs = f.ok("GET", "/repos/octo-org/octo-repo/actions/runs/%d/jobs?filter=latest" % (100000 + lost),
                    token="ghp_admin")
        eq([(j["id"], j["status"], j["labels"]) for j in jobs["jobs"]], [(lost, "queued", ["self-hosted", "x"])],
           "a run's jobs")
        eq(f.call("GET", "/repos/octo-org/octo-repo/actions/runs/1/jobs", token="ghp_admin")[0], 404, "unknown run")
        f.ok("POST", "/_fake/jobs/%d/approve" % held)
        wait_until(lambda: len(rx.got) == 5, 10, "the release")
        p = json.loads(_parse_qs(rx.got[4][1].decode())["payload"][0])
        eq((p["action"], p["workflow_job"]["status"], p["workflow_job"]["id"]), ("queued", "queued", held), "release")
        # Two jobs in one run (run_id given): one in progress makes the run in_progress.
        a = f.ok("POST", "/_fake/jobs", {"labels": ["none"], "name": "a", "run_id": 555})["id"]
        f.ok("POST", "/_fake/jobs", {"labels": ["none"], "name": "b", "run_id": 555})
        f.ok("POST", "/_fake/jobs/%d/complete" % a, {"result": "Succeeded"})
        runs = f.ok("GET", "/repos/octo-org/octo-repo/actions/runs?status=in_progress", token="ghp_admin")
        eq([r["id"] for r in runs["workflow_runs"]], [555], "a run with a job done and one queued")
    finally:
        rx.stop()


@test
def hook_deliveries_api_lists_failures_and_redelivers(c):
    f = c.fake
    rx = Receiver()
    try:
        hook = f.ok("POST", "/_fake/hooks", {"scope": "octo-org", "url": rx.url, "secret": "s"})
        base = "/orgs/octo-org/hooks/%d/deliveries" % hook["id"]
        f.ok("POST", "/_fake/deliveries/drop", {"count": 1, "action": "queued"})
        lost = f.enqueue("lost", labels=["self-hosted", "x"])
        sent = f.enqueue("sent", labels=["self-hosted", "x"])
        wait_until(lambda: len(rx.got) == 1, 10, "the delivery after the dropped one")
        # The receiver has the body before the fake has its answer (and so the delivery's
        # status): wait for the fake to list it.
        wait_until(lambda: len(f.ok("GET", base + "?per_page=100", token="ghp_admin")) == 2, 10,
                   "both deliveries listed")
        items = f.ok("GET", base + "?per_page=100", token="ghp_admin")
        eq([(d["action"], d["status"], d["status_code"], d["redelivery"]) for d in items],
           [("queued", "OK", 200, False), ("queued", "failed to connect to host", 0, False)],
           "newest first; the dropped one failed")
        eq(sorted(items[0]) == sorted(["id", "guid", "delivered_at", "redelivery", "duration", "status",
                                       "status_code", "event", "action", "installation_id", "repository_id",
                                       "throttled_at"]), True, "hook-delivery-item fields")
        # Cursor pagination through Link.
        st, headers, page = f.call("GET", base + "?per_page=1", token="ghp_admin")
        eq((st, [d["id"] for d in page]), (200, [items[0]["id"]]), "first page")
        link = headers.get("Link") or headers.get("link") or ""
        eq("cursor=v1_%d" % items[1]["id"] in link and 'rel="next"' in link, True, "next page's cursor: %s" % link)
        nxt = link.split(">")[0].lstrip("<")
        eq([d["id"] for d in f.ok("GET", nxt[nxt.index("/orgs/"):], token="ghp_admin")], [items[1]["id"]], "second page")
        # One delivery, with its payload.
        one = f.ok("GET", base + "/%d" % items[1]["id"], token="ghp_admin")
        eq((one["guid"], one["request"]["payload"]["workflow_job"]["id"]), (items[1]["guid"], lost), "payload")
        eq(f.call("GET", "/repos/octo-org/octo-repo/actions/jobs/%d" % lost, token="ghp_admin")[2]["status"],
           "queued", "a job's status")
        eq(f.call("GET", base, token="ghp_noadmin")[0], 403, "admin only")
        # Redeliver: a new delivery id, the same guid, sent.
        eq(f.call("POST", base + "/%d/attempts" % items[1]["id"], token="ghp_admin")[0], 202, "redeliver")
        wait_until(lambda: len(rx.got) == 2, 10, "the redelivery")
        wait_until(lambda: len(f.ok("GET", base, token="ghp_admin")) == 3, 10, "the redelivery listed")
        eq(rx.got[1][0].get("x-github-delivery"), items[1]["guid"], "same X-GitHub-Delivery")
        eq(json.loads(rx.got[1][1])["workflow_job"]["id"], lost, "same payload")
        again = f.ok("GET", base, token="ghp_admin")[0]
        eq((again["guid"], again["redelivery"], again["status"], again["id"] > items[0]["id"]),
           (items[1]["guid"], True, "OK", True), "the redelivery listed")
        eq(sent in [json.loads(b)["workflow_job"]["id"] for _, b in rx.got], True, "the other job's delivery")
    finally:
        rx.stop()


def main():
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only tests whose name contains this")
    ap.add_argument("-v", action="store_true", help="print the fake's log on failure")
    args = ap.parse_args()
    VERBOSE = args.v
    tmp = tempfile.mkdtemp(prefix="fakes-selftest-")
    fake = Fake(tmp)
    passed = failed = 0
    t_all = time.monotonic()
    try:
        for fn in TESTS:
            if args.k not in fn.__name__:
                continue
            fake.ok("POST", "/_fake/reset")
            t0 = time.monotonic()
            try:
                fn(Ctx(fake, tmp))
                passed += 1
                print("PASS %-40s %5.2fs" % (fn.__name__, time.monotonic() - t0), flush=True)
            except Exception as e:
                failed += 1
                print("FAIL %-40s %5.2fs" % (fn.__name__, time.monotonic() - t0), flush=True)
                if isinstance(e, Failure):
                    print("     " + str(e).replace("\n", "\n     "), flush=True)
                else:
                    traceback.print_exc()
            finally:
                Proc.kill_all()
    finally:
        Proc.kill_all()
        fake.stop()
        if failed and VERBOSE:
            with open(os.path.join(tmp, "fake.log"), errors="replace") as fh:
                print("--- fake_github log (tail):\n" + "".join(fh.readlines()[-60:]))
        shutil.rmtree(tmp, ignore_errors=True)
    print("(%.1fs)" % (time.monotonic() - t_all))
    print("%d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())

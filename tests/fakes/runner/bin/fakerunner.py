"""Shared code of the fake GitHub Actions runner (bin/Runner.Listener, bin/Runner.Worker).

Behaviour follows the real actions runner (2.336.0), as tests/fakes/SPEC.md describes it. The runner talks to tests/fakes/fake_github.py: the token exchange at
`{api}/actions/runner-registration` (as the real runner does), then our own `/_fake/agent/*`
protocol (documented in fake_github.py) in place of the internal Actions services.

Stdlib only. Terminal output goes through os.write (unbuffered) so that lines are visible to
a supervisor at once and can be written from signal handlers.
"""

import base64
import binascii
import http.client
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http import HTTPStatus
from urllib.parse import quote, urlsplit

def _version():
    """2.336.0, or what `bin/fake-version` says (the update-at-boot tests ship "newer" runners)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake-version")) as f:
            return f.read().strip() or "2.336.0"
    except OSError:
        return "2.336.0"


VERSION = _version()
COMMIT = "258d6c857db3f7a8a8d4c2c6f0e4b1d9a3e5c7b1"
RESULT_NAMES = ("Succeeded", "SucceededWithIssues", "Failed", "Canceled", "Skipped", "Abandoned")
SUCCEEDED, FAILED, CANCELED = 0, 2, 3
INPUT_PREFIX = "ACTIONS_RUNNER_INPUT_"
RUNNER_FILES = (".runner", ".credentials", ".credentials_rsaparams")
DOTNET_STATUS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 408: "RequestTimeout", 409: "Conflict", 410: "Gone",
    422: "UnprocessableEntity", 429: "TooManyRequests", 500: "InternalServerError",
    501: "NotImplemented", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout",
}
BANNER = """\
--------------------------------------------------------------------------------
|                                                                              |
|                   GitHub Actions (fake runner for ci-runner)                 |
|                                                                              |
|                       Self-hosted runner registration                        |
|                                                                              |
--------------------------------------------------------------------------------"""

# Command-line vocabulary per command (section 2.3). Generic flags are valid everywhere.
GENERIC_FLAGS = {"help", "version", "commit", "check"}
KNOWN = {
    "configure": (
        {"url", "token", "pat", "name", "runnergroup", "labels", "work", "auth", "username",
         "password", "monitorsocketaddress", "windowslogonaccount", "windowslogonpassword"},
        {"unattended", "replace", "ephemeral", "disableupdate", "no-default-labels",
         "runasservice", "generateserviceconfig"},
    ),
    "remove": ({"token", "pat"}, {"local"}),
    "run": ({"jitconfig", "startuptype"}, {"once"}),
    "warmup": (set(), set()),
}


# --------------------------------------------------------------------------- small helpers
def ts():
    """`DateTime.UtcNow:u`, e.g. 2026-08-17 14:15:44Z."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())


def env_float(name, default):
    try:
        return float(os.environ.get(name, ""))
    except ValueError:
        return default


def env_truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "$true")


def status_name(code):
    if code in DOTNET_STATUS:
        return DOTNET_STATUS[code]
    try:
        return HTTPStatus(code).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return str(code)


def status_phrase(code):
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def load_json_ci(path):
    """Read a runner JSON file; keys are matched case-insensitively (as Newtonsoft does)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    obj = json.loads(text)
    return {str(k).lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}


def write_json(path, obj, mode=None):
    data = json.dumps(obj, indent=2).encode("utf-8")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


class ConfigError(Exception):
    """A configure/remove failure: the message goes to stderr as one line, exit 1."""


class NetError(Exception):
    """Could not talk to the server at all."""


# --------------------------------------------------------------------------- terminal
class Terminal:
    """Terminal lines + _diag trace, with the ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT copies."""

    def __init__(self, root, kind):
        self.tag = kind.upper()
        self.to_stdout = env_truthy("ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT")
        self.color = os.isatty(1)
        self.diag_path = None
        try:
            diag = os.path.join(root, "_diag")
            os.makedirs(diag, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            self.diag_path = os.path.join(diag, "%s_%s-utc.log" % (kind, stamp))
        except OSError:
            self.diag_path = None

    @staticmethod
    def _write(fd, text):
        data = text.encode("utf-8", "replace")
        while data:
            try:
                n = os.write(fd, data)
            except OSError:
                return
            data = data[n:]

    def _diag(self, text):
        if not self.diag_path:
            return
        try:
            fd = os.open(self.diag_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                self._write(fd, text)
            finally:
                os.close(fd)
        except OSError:
            pass

    def trace(self, msg, source="Runner", level="INFO"):
        stamp = ts()
        for line in (str(msg).splitlines() or [""]):
            self._diag("[%s %s %s] %s\n" % (stamp, level, source, line))
            if self.to_stdout:
                self._write(1, "[%s %s %s %s] %s\n" % (self.tag, stamp, level, source, line))

    def line(self, text="", color=None):
        shown = "\x1b[%sm%s\x1b[0m" % (color, text) if (color and self.color and text) else text
        self._write(1, shown + "\n")
        self.trace("WRITE LINE: " + text, "Terminal")

    def success(self, msg):
        text = "\u221a " + msg
        shown = ("\x1b[32m\u221a \x1b[0m" + msg) if self.color else text
        self._write(1, shown + "\n")
        self.trace("WRITE LINE: " + text, "Terminal")

    def warn(self, msg):
        self.line(msg, color="33")

    def error(self, msg):
        for line in str(msg).splitlines() or [""]:
            self._write(2, line + "\n")
            self.trace("WRITE ERROR: " + line, "Terminal", "ERR ")

    def prompt(self, text):
        self._write(1, text)
        line = sys.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")


# --------------------------------------------------------------------------- command line
def _norm(name):
    return name.lower().replace("_", "-")


class CommandLine:
    """Section 2.2: commands, then `--name value` args and `--name` flags; plus the
    ACTIONS_RUNNER_INPUT_<NAME> environment equivalents (removed from our environment)."""

    def __init__(self, argv, environ):
        self.commands, self.args, self.flags, self.order = [], {}, set(), []
        pending, started = None, False
        for a in argv:
            if a == "/?":
                self._flag("help")
                continue
            if a.startswith("--"):
                if pending is not None:
                    self._flag(pending)
                pending, started = a[2:].lower(), True
                continue
            if not started:
                self.commands.append(a.lower())
                self.order.append(("command", a.lower()))
                continue
            if a.startswith("-") or pending is None:
                continue  # a value starting with '-' (or a stray word) is ignored
            if pending not in self.args:
                self.args[pending] = a
                self.order.append(("arg", pending))
            pending = None
        if pending is not None:
            self._flag(pending)
        self.env = {}
        for key in list(environ.keys()):
            if key.upper().startswith(INPUT_PREFIX) and len(key) > len(INPUT_PREFIX):
                self.env[_norm(key[len(INPUT_PREFIX):])] = environ[key]
                try:
                    del environ[key]
                except KeyError:
                    pass

    def _flag(self, name):
        if name not in self.flags:
            self.flags.add(name)
            self.order.append(("flag", name))

    def arg(self, name):
        value = self.args.get(name)
        if value:
            return value
        value = self.env.get(_norm(name))
        return value if value else None

    def flag(self, name):
        if name in self.flags:
            return True
        value = self.env.get(_norm(name))
        return value is not None and value.strip().lower() == "true"

    def unknown(self, command):
        args, flags = KNOWN.get(command, (set(), set()))
        out = []
        for kind, name in self.order:
            if kind == "command" and name != command:
                out.append(name)
            elif kind == "flag" and name not in flags and name not in GENERIC_FLAGS:
                out.append(name)
            elif kind == "arg" and name not in args:
                out.append(name)
        return out


# --------------------------------------------------------------------------- HTTP
class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            obj = json.loads(self.body.decode("utf-8") or "null")
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    def message(self):
        obj = self.json()
        return str(obj.get("message") or obj.get("error") or self.text() or status_phrase(self.status))


def http_request(method, url, headers=None, body=None, timeout=30.0):
    u = urlsplit(url)
    host, port = u.hostname or "localhost", u.port
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(host, port or 443, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, port or 80, timeout=timeout)
    path = (u.path or "/") + ("?" + u.query if u.query else "")
    hdrs = {"User-Agent": "GitHubActionsRunner-linux-x64/%s" % VERSION, "Accept": "application/json"}
    hdrs.update(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        hdrs["Content-Type"] = "application/json"
    elif method in ("POST", "PUT", "PATCH"):
        data = b""
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, raw)
    except ConnectionRefusedError:
        raise NetError("Connection refused (%s:%s)" % (host, port or (443 if u.scheme == "https" else 80)))
    except socket.timeout:
        raise NetError("The request was canceled due to the configured HttpClient.Timeout of %g seconds elapsing." % timeout)
    except (OSError, http.client.HTTPException) as e:
        raise NetError("%s (%s:%s)" % (e.__class__.__name__ if not str(e) else e, host, port))
    finally:
        conn.close()


def api_base(url):
    """Section 2.6: where the REST API lives for a given --url."""
    u = urlsplit(url)
    host = (u.hostname or "").lower()
    hosted = host == "github.com" or host.endswith(".ghe.com") or host == "github.localhost"
    if hosted and os.environ.get("GITHUB_ACTIONS_RUNNER_FORCE_GHES", "") != "1":
        return "https://api.%s" % u.netloc
    return "%s://%s/api/v3" % (u.scheme, u.netloc)


def valid_url(url):
    try:
        u = urlsplit(url)
        return u.scheme in ("http", "https") and bool(u.hostname)
    except ValueError:
        return False


def retry_sleep():
    fixed = os.environ.get("FAKE_HTTP_RETRY_SEC")
    if fixed:
        try:
            time.sleep(max(0.0, float(fixed)))
            return
        except ValueError:
            pass
    time.sleep(random.uniform(1.0, 5.0))


def post_with_retry(term, url, headers, body):
    """The runner's GitHub HTTP calls: a 404 is final, anything else gets 3 attempts in all;
    every failed attempt prints the `Http response code` line and the body (section 2.4)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            resp = http_request("POST", url, headers, body)
        except NetError as e:
            term.trace("POST %s failed: %s" % (url, e), "GitHubClient", "ERR ")
            if attempt >= 3:
                raise ConfigError(str(e))
            retry_sleep()
            continue
        if 200 <= resp.status < 300:
            return resp
        term.error("Http response code: %s from 'POST %s' (Request Id: %s)"
                   % (status_name(resp.status), url, resp.headers.get("x-github-request-id", "")))
        term.error(resp.text())
        if resp.status == 404 or attempt >= 3:
            raise ConfigError("Response status code does not indicate success: %d (%s)."
                              % (resp.status, status_phrase(resp.status)))
        retry_sleep()


def fetch_token(term, url, pat, kind):
    """Section 2.6: `--pat` → POST .../actions/runners/{registration|remove}-token."""
    segs = [s for s in urlsplit(url).path.split("/") if s]
    if len(segs) == 1:
        path = "orgs/%s" % segs[0]
    elif len(segs) == 2 and segs[0].lower() == "enterprises":
        path = "enterprises/%s" % segs[1]
    elif len(segs) == 2:
        path = "repos/%s/%s" % (segs[0], segs[1])
    else:
        raise ConfigError("'%s' should point to an org or repository." % url)
    auth = base64.b64encode(("github:%s" % pat).encode("utf-8")).decode("ascii")
    endpoint = "%s/%s/actions/runners/%s-token" % (api_base(url), path, kind)
    resp = post_with_retry(term, endpoint, {"Authorization": "basic %s" % auth,
                                            "Accept": "application/vnd.github.v3+json"}, None)
    token = resp.json().get("token")
    if not token:
        raise ConfigError("Could not read a %s token from the response." % kind)
    return token


def exchange_token(term, url, token, event):
    """POST {api}/actions/runner-registration → (agent url, agent-pool bearer, use_v2_flow)."""
    endpoint = "%s/actions/runner-registration" % api_base(url)
    resp = post_with_retry(term, endpoint, {"Authorization": "RemoteAuth %s" % token},
                           {"url": url, "runner_event": event})
    data = resp.json()
    if not data.get("url") or not data.get("token"):
        raise ConfigError("Invalid response from %s" % endpoint)
    return data["url"], data["token"], bool(data.get("use_v2_flow"))


def join_url(base, path):
    return base.rstrip("/") + "/" + path.lstrip("/")


# --------------------------------------------------------------------------- configure/remove
class Configurer:
    def __init__(self, root, term, cl):
        self.root, self.term, self.cl = root, term, cl
        self.unattended = cl.flag("unattended")

    def path(self, name):
        return os.path.join(self.root, name)

    def ask(self, name, prompt, default=None, valid=None):
        value = self.cl.arg(name)
        if value is not None and (valid is None or valid(value)):
            return value
        if self.unattended:
            if value is None and default is not None:
                return default
            raise ConfigError("Invalid configuration provided for %s. Terminating unattended configuration." % name)
        while True:
            hint = "[press Enter for %s] " % default if default else ""
            line = self.term.prompt("%s %s" % (prompt, hint))
            if line is None:
                raise ConfigError("Invalid configuration provided for %s. Terminating unattended configuration." % name)
            line = line.strip() or (default or "")
            if line and (valid is None or valid(line)):
                return line
            if default == "" and not line:
                return ""

    def configure(self):
        t = self.term
        t.line()
        for line in BANNER.splitlines():
            t.line(line)
        t.line()
        if os.path.exists(self.path(".runner")):
            raise ConfigError("Cannot configure the runner because it is already configured. To reconfigure "
                              "the runner, run 'config.cmd remove' or './config.sh remove' first.")
        t.line("# Authentication")
        t.line()
        url = self.ask("url", "Enter the URL of your repository or organization:", valid=valid_url)
        pat = self.cl.arg("pat")
        if pat:
            token = fetch_token(t, url, pat, "registration")
        else:
            token = self.ask("token", "Enter runner registration token:")
        agent_url, bearer, v2 = exchange_token(t, url, token, "register")
        t.line()
        t.success("Connected to GitHub")
        t.line()
        t.line("# Runner Registration")
        t.line()
        group = self.cl.arg("runnergroup") or "Default"
        default_name = socket.gethostname() or "myrunner"
        name = self.ask("name", "Enter the name of runner:", default=default_name)
        no_default = self.cl.flag("no-default-labels")
        labels_arg = self.cl.arg("labels")
        if no_default and not labels_arg:
            raise ConfigError("Disabling default labels via --no-default-labels without specifying --labels is not supported")
        if labels_arg is None and not self.unattended:
            t.line("This runner will have the following labels: 'self-hosted', 'Linux', 'X64' ")
            labels_arg = self.ask("labels", "Enter any additional labels (ex. label-1,label-2): [press Enter to skip]", default="")
        labels, seen = [], set()
        for item in (labels_arg or "").split(","):
            item = item.strip()
            if not item:
                continue
            if len(item) > 256:
                raise ConfigError("Invalid configuration provided for labels. Terminating unattended configuration.")
            if item.lower() not in seen:
                seen.add(item.lower())
                labels.append(item)
        replace = self.cl.flag("replace")
        ephemeral = self.cl.flag("ephemeral")
        disable_update = self.cl.flag("disableupdate")
        while True:
            try:
                resp = http_request("POST", join_url(agent_url, "runners"), {"Authorization": "Bearer %s" % bearer}, {
                    "name": name, "labels": labels, "no_default_labels": no_default, "group": group,
                    "replace": replace, "ephemeral": ephemeral, "disable_update": disable_update,
                    "version": VERSION,
                })
            except NetError as e:
                raise ConfigError(str(e))
            if resp.status == 200:
                break
            err = resp.json().get("error")
            if err == "name_conflict":
                t.warn("A runner exists with the same name")
                if self.unattended:
                    raise ConfigError("A runner exists with the same name %s." % name)
                answer = t.prompt("Would you like to replace the existing runner? (Y/N) [press Enter for N] ")
                if answer is None:
                    raise ConfigError("A runner exists with the same name %s." % name)
                if answer.strip().lower() in ("y", "yes"):
                    replace = True
                else:
                    line = t.prompt("Enter the name of runner: [press Enter for %s] " % default_name)
                    if line is None:
                        raise ConfigError("A runner exists with the same name %s." % name)
                    name = line.strip() or default_name
                continue
            raise ConfigError(resp.message())
        data = resp.json()
        if data.get("replaced"):
            t.warn("A runner exists with the same name")
            t.success("Successfully replaced the runner")
        else:
            t.success("Runner successfully added")
        t.line()
        t.line("# Runner settings")
        t.line()
        work = self.ask("work", "Enter name of work folder:", default="_work")
        settings = {
            "agentId": data["id"],
            "agentName": data["name"],
            "poolId": data["pool_id"],
            "poolName": data["pool_name"],
            "serverUrl": agent_url,
            "gitHubUrl": url,
            "workFolder": work,
        }
        if disable_update:
            settings["disableUpdate"] = True
        if ephemeral:
            settings["ephemeral"] = True
        monitor = self.cl.arg("monitorsocketaddress")
        if monitor:
            settings["monitorSocketAddress"] = monitor
        if v2:
            settings["useV2Flow"] = True
        if not api_base(url).startswith("https://api."):
            settings["isHostedServer"] = False
        creds = {"scheme": "OAuth", "data": {
            "clientId": data["client_id"],
            "authorizationUrl": data["authorization_url"],
            "requireFipsCryptography": "True",
        }}
        write_json(self.path(".credentials"), creds)
        if not os.path.exists(self.path(".credentials_rsaparams")):
            write_json(self.path(".credentials_rsaparams"), fake_rsa_params(), mode=0o600)
        write_json(self.path(".runner"), settings)
        svc = self.path("svc.sh")
        if not os.path.exists(svc):
            with open(svc, "w") as f:
                f.write("#!/bin/bash\necho 'svc.sh is not supported by the fake runner' >&2\nexit 1\n")
            os.chmod(svc, 0o755)
        t.success("Settings Saved.")
        t.line()
        return 0

    def remove(self):
        t = self.term
        t.line()
        t.line("# Runner removal")
        t.line()
        if os.path.exists(self.path(".service")):
            t.error("Failed: Removing service")
            t.error("Uninstall service first")
            return 1
        if not self.cl.flag("local"):
            if os.path.exists(self.path(".runner")) and os.path.exists(self.path(".credentials")):
                try:
                    self.remove_from_server()
                except ConfigError as e:
                    t.error("Failed: Removing runner from the server")
                    t.error(str(e))
                    return 1
            else:
                t.line("Cannot connect to server, because config files are missing. Skipping removing runner from the server.")
        remove_local_files(self.root, t)
        t.line()
        return 0

    def remove_from_server(self):
        t = self.term
        settings = load_json_ci(self.path(".runner"))
        url = settings.get("githuburl") or ""
        pat = self.cl.arg("pat")
        if pat:
            token = fetch_token(t, url, pat, "remove")
        else:
            token = self.ask("token", "Enter runner remove token:")
        agent_url, bearer, _ = exchange_token(t, url, token, "remove")
        auth = {"Authorization": "Bearer %s" % bearer}
        name = settings.get("agentname") or ""
        try:
            resp = http_request("GET", join_url(agent_url, "runners?name=%s" % quote(name)), auth)
            if resp.status != 200:
                raise ConfigError(resp.message())
            matches = resp.json().get("runners") or []
            if not matches:
                t.line("Does not exist. Skipping Removing runner from the server")
                return
            resp = http_request("DELETE", join_url(agent_url, "runners/%d" % matches[0]["id"]), auth)
        except NetError as e:
            raise ConfigError(str(e))
        if resp.status not in (200, 204):
            raise ConfigError(resp.message())
        t.success("Runner removed successfully")


def remove_local_files(root, term):
    """Section 2.7: `√ Removed .credentials` (with the key), then `√ Removed .runner`."""
    creds = os.path.join(root, ".credentials")
    if os.path.exists(creds):
        os.remove(creds)
        try:
            os.remove(os.path.join(root, ".credentials_rsaparams"))
        except FileNotFoundError:
            pass
        term.success("Removed .credentials")
    else:
        term.line("Does not exist. Skipping Removing .credentials")
    runner = os.path.join(root, ".runner")
    if os.path.exists(runner):
        os.remove(runner)
        term.success("Removed .runner")
    else:
        term.line("Does not exist. Skipping Removing .runner")


def fake_rsa_params():
    def rnd(n):
        return base64.b64encode(os.urandom(n)).decode("ascii")
    return {"d": rnd(256), "dp": rnd(128), "dq": rnd(128), "exponent": "AQAB",
            "inverseQ": rnd(128), "modulus": rnd(256), "p": rnd(128), "q": rnd(128)}


# --------------------------------------------------------------------------- Listener run
class Listener:
    def __init__(self, root, term, cl):
        self.root, self.term, self.cl = root, term, cl
        self.shutdown = False
        self.sigterm = False
        self.exit_timer = None
        self.session = None
        self.connected_printed = False
        self.stash = []          # non-cancel messages received while a job ran
        self.job_ran = False
        self.polling = False     # True only while blocked in an idle long-poll
        self.wake_thread = None

    # ---------------------------------------------------------------- signals
    def install_signals(self):
        signal.signal(signal.SIGINT, self.on_sigint)
        signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigint(self, signo, frame):
        if os.environ.get("FAKE_LISTENER_IGNORE_SIGINT", "") in ("1", "true"):
            self.term.trace("SIGINT ignored (FAKE_LISTENER_IGNORE_SIGINT)")
            return
        if not self.shutdown:
            self.term.line("Exiting...")
            self.term.trace("Runner execution has been cancelled (SIGINT).")
            self.begin_shutdown()

    def on_sigterm(self, signo, frame):
        # Section 4.1: the same shutdown, nothing printed; the process is gone after
        # FAKE_SIGTERM_EXIT_SEC whether or not the job finished cancelling.
        self.sigterm = True
        self.term.trace("SIGTERM received, shutting down.")
        self.begin_shutdown()
        if self.exit_timer is None:
            self.exit_timer = threading.Timer(env_float("FAKE_SIGTERM_EXIT_SEC", 30.0), os._exit, args=(143,))
            self.exit_timer.daemon = True
            self.exit_timer.start()

    def begin_shutdown(self):
        """Like the real Listener cancelling its long-poll: when idle, delete the session from a
        side thread. The server then ends the open poll at once, and it can no longer hand us a
        job (a job handed out just before comes back in that poll and is released)."""
        self.shutdown = True
        if self.polling and self.session and self.wake_thread is None:
            sid = self.session
            self.wake_thread = threading.Thread(target=self._delete_session_quietly, args=(sid,), daemon=True)
            self.wake_thread.start()

    def _delete_session_quietly(self, sid):
        try:
            self.agent("DELETE", "sessions/%s" % sid, timeout=10.0)
        except NetError:
            pass

    def done_rc(self):
        return 143 if self.sigterm else 0

    def sleep(self, seconds):
        end = time.monotonic() + seconds
        while not self.shutdown:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    # ---------------------------------------------------------------- server calls
    def agent(self, method, path, body=None, timeout=30.0):
        return http_request(method, join_url(self.server_url, path),
                            {"Authorization": "Bearer %s" % self.client_id}, body, timeout)

    def print_connected(self):
        if not self.connected_printed:
            self.connected_printed = True
            self.term.line()
            self.term.success("Connected to GitHub")
            self.term.line()

    def deprecated(self, message):
        self.term.error("An error occurred: %s" % message)
        return 7 if env_truthy("ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE") else 1

    def create_session(self, reconnect=False):
        """Return None once a session exists, else the Listener's return code."""
        conflicts = 0
        while True:
            if self.shutdown:
                return self.done_rc()
            try:
                resp = self.agent("POST", "sessions", {
                    "session_name": "%s (PID: %d)" % (socket.gethostname(), os.getpid()),
                    "version": VERSION,
                })
            except NetError as e:
                self.term.error("An error occurred: %s" % e)
                return 2
            err = resp.json()
            if resp.status in (200, 201):
                self.session = err["session_id"]
                self.print_connected()
                if reconnect:
                    self.term.line("%s: Runner reconnected." % ts())
                self.term.trace("Session created: %s" % self.session)
                return None
            if resp.status == 401:
                self.term.error("Failed to create a session. The runner registration has been deleted from the "
                                "server, please re-configure. Runner registrations are automatically deleted for "
                                "runners that have not connected to the service recently.")
                return 1
            self.print_connected()
            if err.get("error") == "deprecated":
                return self.deprecated(resp.message())
            if resp.status == 409:
                conflicts += 1
                self.term.error("A session for this runner already exists.")
                if conflicts >= 8:
                    self.term.error("Stop retry on SessionConflictException after retried for 240 seconds.")
                    self.term.error("Failed to create session. %s" % resp.message())
                    return 5
                self.sleep(env_float("FAKE_SESSION_RETRY_SEC", 30.0))
                continue
            self.term.error("An error occurred: %s" % resp.message())
            return 2

    def delete_session(self):
        if not self.session:
            return
        try:
            self.agent("DELETE", "sessions/%s" % self.session, timeout=10.0)
        except NetError as e:
            self.term.trace("Deleting the session failed: %s" % e, level="WARN")
        self.session = None

    # ---------------------------------------------------------------- run
    def run(self):
        t = self.term
        jit = self.cl.arg("jitconfig")
        if jit:
            try:
                write_jit_config(self.root, jit)
            except Exception as e:  # bad base64/JSON → the exception message, rc 1
                t.error(str(e))
                return 1
        runner_file = os.path.join(self.root, ".runner")
        creds_file = os.path.join(self.root, ".credentials")
        if not (os.path.exists(runner_file) and os.path.exists(creds_file)):
            t.error("An error occurred: Not configured. Run config.(sh/cmd) to configure the runner.")
            return 1
        try:
            self.settings = load_json_ci(runner_file)
            creds = load_json_ci(creds_file)
            self.client_id = {str(k).lower(): v for k, v in (creds.get("data") or {}).items()}["clientid"]
            self.server_url = self.settings["serverurl"]
        except (OSError, ValueError, KeyError) as e:
            t.error("An error occurred: Invalid runner configuration: %s" % e)
            return 1
        self.ephemeral = bool(self.settings.get("ephemeral"))
        self.run_once = self.cl.flag("once")
        if self.run_once:
            t.warn("Warning: '--once' is going to be deprecated in the future, please consider using "
                   "'--ephemeral' during runner registration.")
        work = self.settings.get("workfolder") or "_work"
        self.work_folder = work if os.path.isabs(work) else os.path.join(self.root, work)
        self.install_signals()
        rc = self.create_session()
        if rc is not None:
            return rc
        t.line("Current runner version: '%s'" % VERSION)
        t.line("%s: Listening for Jobs" % ts())
        rc = self.message_loop()
        if rc is not None:
            return rc
        if self.wake_thread is not None:
            self.wake_thread.join(10.0)
            self.session = None
        self.delete_session()
        if self.ephemeral and self.job_ran:
            remove_local_files(self.root, t)
        return self.done_rc()

    def message_loop(self):
        """None = leave normally (shutdown, or ephemeral/--once done); int = return code."""
        t = self.term
        wait = min(2.0, max(0.0, env_float("FAKE_POLL_WAIT_SEC", 1.0)))
        sentinel = os.path.join(self.root, ".drain")
        while not self.shutdown or any(m.get("type") == "job" for m in self.stash):
            if env_truthy("FAKE_LISTENER_DRAIN_SENTINEL") and os.path.exists(sentinel) and not self.stash:
                # actions/runner PR #4461: the sentinel, checked at the top of the loop.
                t.trace("Drain sentinel found: leaving the message loop.")
                return None
            received = bool(self.stash)
            if self.stash:
                msg, resp = self.stash.pop(0), None
            else:
                self.polling = True
                try:
                    if self.shutdown:  # a signal arrived just before we started polling
                        break
                    resp = self.agent("GET", "sessions/%s/message?wait=%g" % (self.session, wait),
                                      timeout=wait + 30.0)
                except NetError as e:
                    if self.shutdown:
                        return None
                    t.error("An error occurred: %s" % e)
                    return 2
                finally:
                    self.polling = False
                if resp.status != 200:
                    if self.shutdown:
                        return None
                    rc = self.poll_error(resp)
                    if rc is not None:
                        return rc
                    continue
                msg = resp.json()
            kind = msg.get("type")
            if kind == "job":
                if self.shutdown and not received:
                    self.release(msg["job"])
                    return None
                self.run_job(msg["job"])
                if self.ephemeral or self.run_once:
                    return None
            elif kind == "update":
                rc = self.self_update(msg)
                if rc is not None:
                    return rc
            elif kind == "cancel":
                t.trace("Cancel message for job %s, which is not running." % msg.get("job_id"))
        return None

    def poll_error(self, resp):
        err = resp.json().get("error")
        if resp.status == 404 and err == "runner_deleted":
            self.term.error("The runner no longer exists on the server. Cleaning up local configuration.")
            for name in RUNNER_FILES:
                try:
                    os.remove(os.path.join(self.root, name))
                except FileNotFoundError:
                    pass
            self.session = None
            return 0
        if resp.status == 404 and err == "session_not_found":
            self.session = None
            self.term.trace("The session was dropped by the server; creating a new one.", level="WARN")
            return self.create_session(reconnect=True)
        if err == "deprecated":
            return self.deprecated(resp.message())
        self.term.error("An error occurred: %s" % resp.message())
        return 2

    def release(self, job):
        self.term.trace("Shutting down: handing job %s back to the server." % job.get("id"))
        try:
            self.agent("POST", "jobs/%s/release" % job["id"], {})
        except NetError:
            pass

    # ---------------------------------------------------------------- one job
    def run_job(self, job):
        t = self.term
        name = job.get("name") or "build"
        self.job_ran = True
        t.line("%s: Running job: %s" % (ts(), name))
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        worker = os.path.join(self.root, "bin", "Runner.Worker")
        message = dict(job)
        message.update(runner_name=self.settings.get("agentname") or "", work_folder=self.work_folder,
                       root=self.root)
        rc = None
        try:
            proc = subprocess.Popen([worker, "spawnclient", str(to_worker_r), str(from_worker_w)],
                                    pass_fds=(to_worker_r, from_worker_w), stdin=subprocess.DEVNULL)
        except OSError as e:
            t.trace("Failed to start the worker: %s" % e, level="ERR ")
            proc, rc = None, -1
        os.close(to_worker_r)
        os.close(from_worker_w)
        cancel_sent = False

        def send(obj):
            try:
                os.write(to_worker_w, (json.dumps(obj) + "\n").encode("utf-8"))
            except OSError:
                pass

        if proc is not None:
            send({"type": "job", "job": message})
            next_check = time.monotonic() + 0.5
            while True:
                try:
                    rc = proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.shutdown and not cancel_sent:
                    t.trace("Shutdown: sending RunnerShutdown to the worker.")
                    send({"type": "cancel", "reason": "shutdown"})
                    cancel_sent = True
                if not self.shutdown and not cancel_sent and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    if self.poll_for_cancel(job):
                        send({"type": "cancel", "reason": "server"})
                        cancel_sent = True
        os.close(to_worker_w)
        os.close(from_worker_r)
        result = RESULT_NAMES[rc - 100] if rc is not None and 100 <= rc <= 105 else "Failed"
        t.trace("Worker exited with %s" % rc)
        if env_truthy("FAKE_LISTENER_REPORT_FIRST"):
            # The real order with run-service jobs: the Worker reports the result itself before
            # it exits, the Listener is back in its message loop (GitHub may hand it the next
            # job at once), and only then is `completed with result` printed.
            self.report(job, result)
            self.poll_once()
            t.line("%s: Job %s completed with result: %s" % (ts(), name, result))
        else:
            t.line("%s: Job %s completed with result: %s" % (ts(), name, result))
            self.report(job, result)

    def report(self, job, result):
        t = self.term
        try:
            resp = self.agent("POST", "jobs/%s/complete" % job["id"], {"result": result})
            if resp.status != 200:
                t.trace("Reporting the job result failed: %d %s" % (resp.status, resp.text()), level="ERR ")
        except NetError as e:
            t.trace("Reporting the job result failed: %s" % e, level="ERR ")

    def poll_once(self):
        """One poll right after a job (FAKE_LISTENER_REPORT_FIRST): a job it brings has been
        received, and runs next even if a stop comes meanwhile (then cancelled), as in the real
        Listener."""
        if not self.session or self.shutdown:
            return
        try:
            resp = self.agent("GET", "sessions/%s/message?wait=0" % self.session, timeout=10.0)
        except NetError:
            return
        if resp.status == 200:
            msg = resp.json()
            if msg.get("type") not in (None, "none"):
                self.stash.append(msg)

    def poll_for_cancel(self, job):
        """While a job runs, look (without waiting) for a server-side cancel."""
        if not self.session:
            return False
        try:
            resp = self.agent("GET", "sessions/%s/message?wait=0" % self.session, timeout=10.0)
        except NetError:
            return False
        if resp.status != 200:
            return False
        msg = resp.json()
        if msg.get("type") == "cancel" and str(msg.get("job_id")) == str(job.get("id")):
            return True
        if msg.get("type") not in (None, "none", "cancel"):
            self.stash.append(msg)
        return False

    # ---------------------------------------------------------------- self-update
    def self_update(self, msg):
        t = self.term
        if self.settings.get("disableupdate"):
            t.trace("Ignoring a self-update message: the runner was configured with --disableupdate.")
            return None
        version = str(msg.get("version") or "")
        t.line("Runner update in progress, do not shutdown runner.")
        t.line("Downloading %s runner" % version)
        t.line("Waiting for current job finish running.")
        t.line("Generate and execute update script.")
        os.makedirs(self.work_folder, exist_ok=True)
        diag = os.path.join(self.root, "_diag")
        os.makedirs(diag, exist_ok=True)
        log = os.path.join(diag, "SelfUpdate-%s.log" % time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        script = os.path.join(self.work_folder, "_update.sh")
        with open(script, "w") as f:
            f.write(UPDATE_SCRIPT % {"pid": os.getpid(), "log": log, "version": version})
        logf = open(log, "a")
        # Started detached, not waited for: once we exit it is re-parented (section 4.8).
        subprocess.Popen(["bash", script], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        t.line("Runner will exit shortly for update, should be back online within 10 seconds.")
        self.delete_session()
        return 4 if (self.ephemeral or self.run_once) else 3


UPDATE_SCRIPT = """#!/bin/bash
# Fake self-update script (section 4.8): wait for the Listener to be gone (and reaped),
# then report success. It does not swap bin/ or externals/.
runnerpid=%(pid)d
logfile='%(log)s'
echo "$(date -u '+%%Y-%%m-%%d %%H:%%M:%%SZ'): waiting for runner process $runnerpid to exit"
while [ -e /proc/$runnerpid ]; do
    sleep 0.05
done
echo "$(date -u '+%%Y-%%m-%%d %%H:%%M:%%SZ'): runner process exited; pretending to install %(version)s"
touch update.finished
echo "Runner update process finished."
mv -f "$logfile" "$logfile.succeed" 2>/dev/null
"""


def write_jit_config(root, value):
    """Section 5.2: base64 → JSON {filename: base64 of the bytes}, each written to the root."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("The input is not a valid Base-64 string as it contains a non-base 64 character, "
                         "more than two padding characters, or an illegal character among the padding characters.")
    obj = json.loads(raw.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("Invalid JIT configuration: expected a JSON object.")
    for name, content in obj.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError("Invalid file name in JIT configuration: %s" % name)
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError("The input is not a valid Base-64 string as it contains a non-base 64 character, "
                             "more than two padding characters, or an illegal character among the padding characters.")
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


def load_dotenv(root):
    """Program.LoadAndSetEnv: KEY=VALUE lines of <root>/.env into our environment."""
    try:
        with open(os.path.join(root, ".env"), encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\r\n")
                key, sep, value = line.partition("=")
                if sep and key.strip():
                    os.environ[key.strip()] = value
    except OSError:
        pass


USAGE = """\
Commands:
 ./config.sh         Configures the runner
 ./config.sh remove  Unconfigures the runner
 ./run.sh            Runs the runner interactively. Does not require any options.

Options:
 --help     Prints the help for each command
 --version  Prints the runner version
 --commit   Prints the runner commit
 --check    Check the runner's network connectivity with GitHub server

Config Options:
 --unattended           Disable interactive prompts for missing arguments. Defaults will be used for missing options
 --url string           Repository to add the runner to. Required if unattended
 --token string         Registration token. Required if unattended
 --name string          Name of the runner to configure (default %s)
 --runnergroup string   Name of the runner group to add this runner to (defaults to the default runner group)
 --labels string        Custom labels that will be added to the runner. This option is mandatory if --no-default-labels is used.
 --no-default-labels    Disables adding the default labels: 'self-hosted,Linux,X64'
 --work string          Relative runner work directory (default _work)
 --replace              Replace any existing runner with the same name (default false)
 --pat                  GitHub personal access token with repo scope. Used for checking network connectivity when executing `./run.sh --check`
 --disableupdate        Disable self-hosted runner automatic update to the latest released version`
 --ephemeral            Configure the runner to only take one job and then let the service un-configure the runner after the job finishes (default false)

Examples:
 Check GitHub server network connectivity:
  ./run.sh --check --url <url> --pat <pat>
 Configure a runner non-interactively:
  ./config.sh --unattended --url <url> --token <token>
"""


def listener_main(script):
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    load_dotenv(root)
    cl = CommandLine(sys.argv[1:], os.environ)
    term = Terminal(root, "Runner")
    term.trace("Runner.Listener %s (fake) pid %d argv %s" % (VERSION, os.getpid(), cl.commands))
    if cl.flag("version"):
        term._write(1, VERSION + "\n")
        return 0
    if cl.flag("commit"):
        term._write(1, COMMIT + "\n")
        return 0
    if cl.flag("help"):
        term._write(1, USAGE % (socket.gethostname() or "myrunner"))
        return 0
    command = cl.commands[0] if cl.commands else "run"
    if command not in KNOWN:
        command = "run" if not cl.commands else command
    unknown = cl.unknown(command)
    if unknown:
        term.error("Unrecognized command-line input arguments for command %s: '%s'. For usage refer to: "
                   ".\\config.cmd --help or ./config.sh --help" % (command, ", ".join(unknown)))
    if cl.flag("check"):
        term.line("Checking connectivity is not implemented by the fake runner; nothing to check.")
        return 0
    if command in ("configure", "remove"):
        def on_sigint(signo, frame):
            term.line("Exiting...")
            os._exit(1)
        signal.signal(signal.SIGINT, on_sigint)
        conf = Configurer(root, term, cl)
        try:
            return conf.configure() if command == "configure" else conf.remove()
        except ConfigError as e:
            term.error(str(e))
            return 1
        except Exception as e:  # any error: one line on stderr, exit 1 (section 2.5)
            term.trace(repr(e), level="ERR ")
            term.error(str(e) or e.__class__.__name__)
            return 1
    if command == "warmup":
        return 0
    if command != "run":
        term.error("Unknown command: %s" % command)
        term._write(1, USAGE % (socket.gethostname() or "myrunner"))
        return 1
    listener = Listener(root, term, cl)
    try:
        return listener.run()
    except Exception as e:
        import traceback
        term.trace(traceback.format_exc(), level="ERR ")
        term.error("An error occurred: %s" % (str(e) or e.__class__.__name__))
        return 2


# --------------------------------------------------------------------------- Worker
class LineReader:
    def __init__(self, fd):
        self.fd, self.buf, self.eof = fd, b"", False

    def readline(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = None if end is None else max(0.0, end - time.monotonic())
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
        if b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            return line.decode("utf-8", "replace")
        if self.buf:
            line, self.buf = self.buf, b""
            return line.decode("utf-8", "replace")
        return None


def process_tree(root_pid):
    """root_pid and its descendants (by /proc ppid links) at this moment."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, stack = [root_pid], [root_pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


class Worker:
    def __init__(self, root, term):
        self.root, self.term = root, term
        self.cancel = False

    def on_sigterm(self, signo, frame):
        self.term.trace("SIGTERM: cancelling the job.", "Worker")
        self.cancel = True

    def read_channel(self, reader):
        while True:
            line = reader.readline()
            if line is None:
                if reader.eof:
                    if not self.cancel:
                        self.term.trace("Channel to the Listener closed: cancelling the job.", "Worker")
                    self.cancel = True
                    return
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "cancel":
                self.term.trace("Received %s cancellation from the Listener." % msg.get("reason", ""), "Worker")
                self.cancel = True

    def run_process(self, argv, cwd, env, cancellable):
        """Run one step or hook. Returns (exit status, canceled?)."""
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
        except OSError as e:
            self.term.trace("Cannot start %s: %s" % (argv, e), "Worker", "ERR ")
            return 1, False
        phase, since = 0, 0.0
        sigint_wait = env_float("FAKE_CANCEL_SIGINT_WAIT_SEC", 7.5)
        sigterm_wait = env_float("FAKE_CANCEL_SIGTERM_WAIT_SEC", 2.5)
        while True:
            try:
                rc = proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if not (cancellable and self.cancel):
                continue
            now = time.monotonic()
            # ProcessInvoker: SIGINT → 7.5 s → SIGTERM → 2.5 s → kill (section 4.2).
            if phase == 0:
                self.signal_tree(proc.pid, signal.SIGINT)
                phase, since = 1, now
            elif phase == 1 and now - since >= sigint_wait:
                self.signal_tree(proc.pid, signal.SIGTERM)
                phase, since = 2, now
            elif phase == 2 and now - since >= sigterm_wait:
                self.signal_tree(proc.pid, signal.SIGKILL)
                phase = 3
        if cancellable and not self.cancel and (rc < 0 or rc in (130, 143)):
            # run.sh's trap signals the whole process group, so a step can die of SIGINT just
            # before the Listener's cancel message reaches us; give that message a moment.
            end = time.monotonic() + env_float("FAKE_WORKER_CANCEL_GRACE_SEC", 1.0)
            while not self.cancel and time.monotonic() < end:
                time.sleep(0.02)
        return rc, cancellable and (phase > 0 or self.cancel)

    def signal_tree(self, pid, sig):
        self.term.trace("Sending %s to the process tree of %d" % (signal.Signals(sig).name, pid), "Worker")
        for p in process_tree(pid):
            try:
                os.kill(p, sig)
            except OSError:
                pass

    def main(self, argv):
        t = self.term
        if len(argv) < 3 or argv[0].lower() != "spawnclient":
            t.error("usage: Runner.Worker spawnclient <pipeIn> <pipeOut>")
            return 1
        fd_in = int(argv[1])
        signal.signal(signal.SIGINT, lambda s, f: t.trace("SIGINT ignored by the worker.", "Worker"))
        signal.signal(signal.SIGTERM, self.on_sigterm)
        reader = LineReader(fd_in)
        line = reader.readline(timeout=env_float("FAKE_WORKER_JOB_WAIT_SEC", 30.0))
        if line is None:
            t.trace("No job message arrived; exiting.", "Worker", "ERR ")
            return 1
        job = json.loads(line).get("job") or {}
        threading.Thread(target=self.read_channel, args=(reader,), daemon=True).start()

        name = str(job.get("name") or "build")
        repository = str(job.get("repository") or "octo-org/octo-repo")
        repo_name = repository.split("/")[-1] or "repo"
        work = str(job.get("work_folder") or os.path.join(self.root, "_work"))
        if not os.path.isabs(work):
            work = os.path.join(self.root, work)
        workspace = os.path.join(work, repo_name, repo_name)
        temp = os.path.join(work, "_temp")
        os.makedirs(workspace, exist_ok=True)
        os.makedirs(temp, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_REPOSITORY": repository,
            "GITHUB_JOB": name,
            "GITHUB_RUN_ID": str(job.get("id", "")),
            "GITHUB_WORKSPACE": workspace,
            "RUNNER_NAME": str(job.get("runner_name") or ""),
            "RUNNER_OS": "Linux",
            "RUNNER_ARCH": "X64",
            "RUNNER_TEMP": temp,
            "RUNNER_WORKSPACE": os.path.join(work, repo_name),
            "RUNNER_TRACKING_ID": "github_%s" % uuid.uuid4(),
        })
        t.trace("Job %s (%s) starting in %s" % (job.get("id"), name, workspace), "Worker")
        failed = canceled = False
        started = os.environ.get("ACTIONS_RUNNER_HOOK_JOB_STARTED")
        if started:
            rc, was_canceled = self.run_process(["bash", "-e", started], workspace, env, True)
            canceled |= was_canceled
            failed |= rc != 0 and not was_canceled
        if not failed and not canceled and not self.cancel:
            rc, was_canceled = self.run_process(["bash", "-e", "-c", str(job.get("steps") or "true")],
                                                workspace, env, True)
            canceled |= was_canceled
            failed |= rc != 0 and not was_canceled
            t.trace("Steps exited with %s" % rc, "Worker")
        completed = os.environ.get("ACTIONS_RUNNER_HOOK_JOB_COMPLETED")
        if completed:
            # Registered with always(): runs after a failure or a cancel too.
            rc, _ = self.run_process(["bash", "-e", completed], workspace, env, False)
            failed |= rc != 0
        canceled |= self.cancel
        result = CANCELED if canceled else (FAILED if failed else SUCCEEDED)
        orphans = int(env_float("FAKE_WORKER_ORPHANS", 0))
        if orphans > 0:
            # Test knob: leave daemonised grandchildren behind (re-parented at once).
            secs = env_float("FAKE_WORKER_ORPHAN_SEC", 1.0)
            subprocess.run(["bash", "-c", 'for i in $(seq %d); do (sleep %g &); done' % (orphans, secs)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t.trace("Job %s finished: %s" % (job.get("id"), RESULT_NAMES[result]), "Worker")
        return 100 + result


def worker_main(script):
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    term = Terminal(root, "Worker")
    try:
        return Worker(root, term).main(sys.argv[1:])
    except Exception:
        import traceback
        term.trace(traceback.format_exc(), "Worker", "ERR ")
        term.error(traceback.format_exc())
        return 1

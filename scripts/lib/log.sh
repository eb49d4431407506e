# shellcheck shell=bash
# Sourced by the set-up scripts: a step's own output goes to a log file, so a working set-up says
# a line per step, and a failing one shows the end of the log and where the rest of it is.
# Before sourcing, set log_name (the prefix of every message) and log_file (made afresh).
mkdir -p "$(dirname "$log_file")"
: >"$log_file"

# Runs a command, its output appended to the log; on failure, exits with its status.
quietly() {
    echo "\$ $*" >>"$log_file"
    local status=0
    "$@" >>"$log_file" 2>&1 || status=$?
    if [[ $status -ne 0 ]]; then
        echo "$log_name: '$*' failed (exit $status); the end of $log_file:" >&2
        tail -n 25 "$log_file" | sed 's/^/    /' >&2
        echo "$log_name: the whole output is in $log_file" >&2
        exit "$status"
    fi
}

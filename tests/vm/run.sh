#!/usr/bin/env bash
# run.sh: runs inside the guest (test-vm.sh starts it over ssh). Runs every
# NN-*.sh beside it in name order (or those whose name contains one of the arguments),
# each as its own bash process in a fresh scratch dir, then prints the tally as the last
# line, exactly `N passed, N failed`, and exits non-zero on any failure. A file that
# exits non-zero (crashed between checks) counts as one more failure.
set -u
DIR=$(cd "$(dirname "$0")" && pwd)
RESULTS=$(mktemp /tmp/vm-results.XXXXXX)
export RESULTS
pending=()

echo "== guest: kernel $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) " MiB" }' /proc/meminfo)"
[[ -r /mnt/host/guest-versions.txt ]] && sed 's/^/   /' /mnt/host/guest-versions.txt

for f in "$DIR"/[0-9][0-9]-*.sh; do
    name=$(basename "$f" .sh)
    if (($#)); then
        hit=0
        for p in "$@"; do [[ $name == *"$p"* ]] && hit=1; done
        ((hit)) || continue
    fi
    # `# needs: SUBCOMMAND...`: the file tests a feature that lands in main later; run it
    # as soon as the binary under test has those subcommands. Until then it is listed as
    # pending, loudly, on the line before the tally.
    missing=()
    for sub in $(sed -n 's/^# needs: *//p' "$f"); do
        /mnt/host/bin/snapveil "$sub" --help >/dev/null 2>&1 || missing+=("$sub")
    done
    if ((${#missing[@]})); then
        echo "== $name: PENDING, this snapveil has no \`${missing[*]}\` subcommand yet"
        pending+=("$name")
        continue
    fi
    echo "== $name"
    t0=$(date +%s)
    work=$(mktemp -d "/tmp/vm-$name.XXXXXX")
    rc=0
    (cd "$work" && bash "$f") || rc=$?
    if ((rc != 0)); then
        echo "FAIL: $name exited $rc"
        echo "FAIL $name exited $rc" >>"$RESULTS"
    fi
    echo "== $name: $(($(date +%s) - t0))s"
    rm -rf "$work"
done

((${#pending[@]})) && echo "pending (features not in this build): ${pending[*]}"
passed=$(grep -c '^PASS ' "$RESULTS")
failed=$(grep -c '^FAIL ' "$RESULTS")
rm -f "$RESULTS"
echo "$passed passed, $failed failed"
((failed == 0 && passed > 0))

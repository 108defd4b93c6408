#!/usr/bin/env bash
# test-vm.sh: the real-kernel test tier (`make test-vm`). Builds the guest if the cache
# has none for the current key, stages the build under test, boots ONE guest, runs every
# tests/vm/[0-9][0-9]-*.sh in it, powers it off, and ends with exactly one line
# `N passed, N failed`; the exit status is non-zero on any failure.
#
# Usage: scripts/vm/test-vm.sh [PATTERN...]
#   PATTERN   run only the guest test files whose name contains one of them
# Without a pattern the files are split over SNAPVEIL_VM_SHARDS guests (default 2) that
# run at once, each a run of this script with its share of the files as patterns (by
# each file's `# seconds: N` line, so that the guests end about together): a TCG guest
# runs mostly one vCPU at a time, so two keep both host cores busy. The last line then
# sums their tallies.
# Env: SNAPVEIL_BIN   binary under test (default target/debug/snapveil; `make test-vm`
#                     builds it). Host and guest are both bookworm (glibc 2.36).
#      SNAPVEIL_VM_LOG  copy of the whole guest output (default target/vm-test.log)
#      SNAPVEIL_VM_OOPS_GRACE  seconds the tests get after a guest kernel oops (300)
#      and vmlib.sh's SNAPVEIL_VM_* settings.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=vmlib.sh
. "$HERE/vmlib.sh"

SHARDS=${SNAPVEIL_VM_SHARDS:-2}
if (($# == 0)) && ((SHARDS > 1)) && [[ -z ${SNAPVEIL_VM_SHARD:-} ]]; then
    T0=$(date +%s.%N)
    mapfile -t files < <(cd "$REPO/tests/vm" && printf '%s\n' [0-9][0-9]-*.sh | sed 's/\.sh$//')
    outs=() pids=()
    trap 'kill "${pids[@]}" 2>/dev/null; wait' TERM INT
    # Longest first, each to the guest with the least so far, by the `# seconds: N` line
    # of each file (its time under TCG; 60 without one): the tier lasts as long as its
    # slowest guest.
    secs() { s=$(sed -n 's/^# seconds: \([0-9][0-9]*\)$/\1/p' "$REPO/tests/vm/$1.sh" | head -n 1) && echo "${s:-60}"; }
    mapfile -t files < <(for f in "${files[@]}"; do echo "$(secs "$f") $f"; done | sort -k1,1nr -k2 | cut -d' ' -f2)
    declare -A part load
    for ((k = 0; k < SHARDS; k++)); do load[$k]=0 part[$k]=; done
    for f in "${files[@]}"; do
        best=0
        for ((k = 1; k < SHARDS; k++)); do ((load[$k] < load[$best])) && best=$k; done
        load[$best]=$((load[$best] + $(secs "$f")))
        part[$best]+=" $f"
    done
    for ((k = 0; k < SHARDS; k++)); do
        read -r -a sel <<<"${part[$k]}"
        ((${#sel[@]})) || continue
        out=$(mktemp "/tmp/snapveil-vm-shard$k.XXXXXX")
        outs+=("$out")
        echo "== guest $k: ${sel[*]}"
        # Each shard's lines as they come, tagged; its whole output kept for the tally.
        SNAPVEIL_VM_SHARD=$k SNAPVEIL_VM_LOG=${SNAPVEIL_VM_LOG:-$REPO/target/vm-test.log}.$k \
            "$0" "${sel[@]}" > >(tee "$out" | sed -u "s/^/[guest $k] /") 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    sleep 1 # the tee/sed of the last lines
    # The failures again, with their output, just above the tally: a CI log that keeps
    # only its tail then still says which checks failed and why.
    fails=$(for k in "${!outs[@]}"; do
        awk -v g="$k" '/^FAIL/ { n = 8; print "[guest " g "] " $0; next }
            n > 0 && /^    / { n--; print "[guest " g "] " $0; next } { n = 0 }' "${outs[$k]}"
    done)
    [[ -z $fails ]] || printf '== failed checks, again:\n%s\n' "$fails"
    passed=0 failed=0
    for o in "${outs[@]}"; do
        if [[ $(tail -n 1 "$o") =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
            passed=$((passed + BASH_REMATCH[1])) failed=$((failed + BASH_REMATCH[2]))
        else
            echo "FAIL: a guest run ended without a tally ($o)"
            failed=$((failed + 1))
        fi
        rm -f "$o"
    done
    echo "== tier: ${#outs[@]} guests at once, total $(vm_elapsed "$T0")s"
    echo "$passed passed, $failed failed"
    ((failed == 0))
    exit
fi

T0=$(date +%s.%N)
BIN=${SNAPVEIL_BIN:-$REPO/target/debug/snapveil}
LOG=${SNAPVEIL_VM_LOG:-$REPO/target/vm-test.log}
[[ -x $BIN ]] || vm_die "$BIN is missing: run \`cargo build\` (or set SNAPVEIL_BIN)"
mkdir -p "$(dirname "$LOG")"

# Boot failures and a lost ssh connection count as failures too: the last line
# always says what happened.
summary() {
    local passed=$1 failed=$2
    echo "== tier: build/cache ${T_BUILD:-?}s, boot ${VM_BOOT_S:-?}s, tests ${T_TESTS:-?}s, total $(vm_elapsed "$T0")s"
    echo "$passed passed, $failed failed"
    ((failed == 0))
}

# The tier's own scripts first (shellcheck, mirror parser): seconds, no guest.
# (Once for all shards: by the first.)
if ((${SNAPVEIL_VM_SHARD:-0} == 0)); then
    self_out=$("$HERE/selftest.sh" 2>&1) || true
    echo "$self_out"
    [[ $(tail -n 1 <<<"$self_out") =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]] || vm_die "selftest.sh printed no tally"
    SELF_PASSED=${BASH_REMATCH[1]} SELF_FAILED=${BASH_REMATCH[2]}
else
    SELF_PASSED=0 SELF_FAILED=0
fi

t=$(date +%s.%N)
GUEST=$("$HERE/build-guest.sh") || { echo "FAIL: building the guest"; summary "$SELF_PASSED" $((SELF_FAILED + 1)); exit 1; }
T_BUILD=$(vm_elapsed "$t")

# Stage the build under test: a copy, so a concurrent `cargo build` cannot change the
# binary mid-run, exported read-only (the guest cannot write into the host's tree).
vm_rundir
share=$VM_RUN/share
install -D -m 755 "$BIN" "$share/bin/snapveil"
cp -r "$REPO/tests/vm" "$share/tests-vm"
for d in tests/fixtures hooks examples; do
    [[ -d $REPO/$d ]] && mkdir -p "$share/$(dirname "$d")" && cp -r "$REPO/$d" "$share/$d"
done
cp "$GUEST/versions.txt" "$share/guest-versions.txt"
cp "$REPO/README.md" "$share/README.md"
# The Debian package of the binary under test, and a rebuild with a newer version for the
# upgrade (tests/vm/70-systemd.sh installs both with dpkg -i). lintian runs in the cargo
# tier (tests/ops.rs); here only the package is needed.
deb_version=$(sed -n '1s/^snapveil (\([^)]*\)).*/\1/p' "$REPO/packaging/debian/changelog")
for d in "deb:" "deb-upgrade:$deb_version+vmtest1"; do
    if ! SNAPVEIL_BIN=$BIN SNAPVEIL_DEB_LINTIAN=0 SNAPVEIL_DEB_COMPRESS=gzip SNAPVEIL_DEB_VERSION=${d#*:} \
        "$REPO/scripts/build-deb.sh" "$share/${d%%:*}" >/dev/null; then
        echo "FAIL: building the Debian package (${d%%:*})"
        summary "$SELF_PASSED" $((SELF_FAILED + 1))
        exit 1
    fi
done

# One disk per test file that needs one (each file owns and wipes its disks), sparse.
mapfile -t disks < <(sed -n 's/^# disks: *//p' "$REPO"/tests/vm/[0-9][0-9]-*.sh | tr ' ' '\n' | sed '/^$/d' | sort -u)
vm_start "$GUEST" "${disks[@]}"
if ! vm_wait; then
    echo "FAIL: the guest did not boot"
    summary "$SELF_PASSED" $((SELF_FAILED + 1))
    exit 1
fi

# A guest kernel oops fails checks through no fault of theirs, and can leave every later
# zfs command hung (seen: OpenZFS 2.1.11's NULL dereference in zio_crypt_copy_dnode_bonus
# on mounting a raw-received encrypted tree under TCG, openzfs/zfs#11679 and #15399).
# Once the console shows one, the tests get OOPS_GRACE seconds more, then the guest is
# stopped: a failure that says why, not a run hung until CI's time is up.
OOPS='BUG: |Oops: '
OOPS_GRACE=${SNAPVEIL_VM_OOPS_GRACE:-300}
watch_oops() {
    while kill -0 "$VM_PID" 2>/dev/null; do
        if grep -qE "$OOPS" "$VM_RUN/console.log" 2>/dev/null; then
            sleep "$OOPS_GRACE"
            kill "$VM_PID" 2>/dev/null
            return
        fi
        sleep 5
    done
}
watch_oops >/dev/null 2>&1 &
watcher=$!

t=$(date +%s.%N)
rc=0
# not a pipeline: bash would defer a TERM's trap until the pipeline ends
vm_ssh bash /mnt/host/tests-vm/run.sh "$@" </dev/null > >(tee "$LOG") 2>&1 || rc=$?
wait $! || true # tee has written everything
T_TESTS=$(vm_elapsed "$t")
pkill -P "$watcher" 2>/dev/null || true
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
oops=0
if grep -qE "$OOPS" "$VM_RUN/console.log" 2>/dev/null; then
    echo "FAIL: the guest kernel oopsed (checks after it may have failed or hung for that alone):"
    { grep -E "$OOPS|Comm: |RIP: |^\[[ 0-9.]+\]  [a-z_0-9.]+\+0x" "$VM_RUN/console.log" || true; } |
        head -n 8 | sed 's/^/    /' || true
    oops=1
fi
pid=$VM_PID run=$VM_RUN
vm_stop

line=$(tail -n 1 "$LOG")
if [[ $line =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=${BASH_REMATCH[1]} failed=${BASH_REMATCH[2]}
    if ((rc != 0 && failed == 0)); then
        echo "FAIL: the guest run exited $rc"
        failed=1
    fi
else
    echo "FAIL: the guest run ended without a summary (exit $rc; ssh lost?)"
    passed=$(grep -c '^PASS: ' "$LOG" || true)
    failed=$(($(grep -c '^FAIL: ' "$LOG" || true) + 1))
fi
# The guard's promise, checked on the normal path out (the other paths: docs/vm-tier.md).
if ! kill -0 "$pid" 2>/dev/null && [[ ! -e $run ]]; then
    echo "PASS: guest stopped: no qemu (pid $pid), no run dir or scratch disk left"
    passed=$((passed + 1))
else
    echo "FAIL: qemu $pid or $run still there after the guest was stopped"
    failed=$((failed + 1))
fi
summary $((passed + SELF_PASSED)) $((failed + SELF_FAILED + oops))

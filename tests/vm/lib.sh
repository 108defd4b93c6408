# shellcheck shell=bash
# lib.sh: helpers for the guest test files (sourced by each tests/vm/NN-*.sh, which
# run.sh starts as `bash FILE` in a fresh scratch dir, as root, inside the qemu guest).
#
# A test file is a sequence of `check DESCRIPTION SNIPPET` lines; every check appends one
# PASS/FAIL line to $RESULTS, which run.sh counts. A file declares the scratch disks it
# owns with a `# disks: name:size ...` comment (test-vm.sh creates them); it alone uses
# them, so a failure in one file cannot leave a pool or VG in another's way. Its
# `# seconds: N` line (about its time under TCG) is what test-vm.sh shares the files
# between its guests by.

: "${RESULTS:?run by tests/vm/run.sh}"
SHARE=/mnt/host
SNAPVEIL=$SHARE/bin/snapveil
export SNAPVEIL_LOG=${SNAPVEIL_LOG:-info}

# check DESCRIPTION SNIPPET: runs SNIPPET (bash, eval'd in a subshell so compound tests
# read naturally and an `exit` or `cd` in it stays there); exit 0 passes. On failure its
# output's tail is printed, indented.
check() {
    local desc=$1 snippet=$2 out rc=0 t0
    out=$(mktemp)
    t0=$(date +%s.%N)
    (eval "$snippet") >"$out" 2>&1 </dev/null || rc=$?
    local dt
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        echo "PASS: $desc (${dt}s)"
        echo "PASS $desc" >>"$RESULTS"
    else
        echo "FAIL: $desc (exit $rc, ${dt}s)"
        tail -n 25 "$out" | sed 's/^/    /'
        echo "FAIL $desc" >>"$RESULTS"
    fi
    rm -f "$out"
    return 0
}

# disk NAME: the scratch disk this file declared (stable name, whatever the probe order).
disk() {
    local d=/dev/disk/by-id/virtio-$1
    [[ -b $d ]] || { echo "no scratch disk $d: add it to the file's '# disks:' line" >&2; return 1; }
    echo "$d"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# tree_digest DIR: one digest over every entry's type, mode, path, symlink target and
# content, so two trees compare equal only if they are. (Not directory sizes: they are
# the file system's business, ZFS counts entries, ext4 blocks.)
tree_digest() {
    (cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort &&
        find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum) | sha256sum | cut -d' ' -f1
}

# random_tree DIR MIB: a small tree with nested dirs, a symlink, odd names and MIB MiB of data.
random_tree() {
    local dir=$1 mib=$2
    mkdir -p "$dir/etc/conf.d" "$dir/var/lib/app" "$dir/with space"
    echo "hello $(date +%s%N)" >"$dir/etc/motd"
    printf 'k=v\n' >"$dir/etc/conf.d/a.conf"
    head -c $((mib * 1024 * 1024)) /dev/urandom >"$dir/var/lib/app/data.bin"
    head -c 12345 /dev/urandom >"$dir/with space/odd name ü.txt"
    : >"$dir/var/lib/app/empty"
    ln -s ../etc/motd "$dir/var/motd-link"
    chmod 640 "$dir/etc/conf.d/a.conf"
}

# snapveil ARGS...: the binary under test, its output on stdout/stderr for `check`.
snapveil() { "$SNAPVEIL" "$@"; }

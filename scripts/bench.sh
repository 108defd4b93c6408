#!/usr/bin/env bash
# bench.sh (`make bench`): snapveil's encrypted view against `gocryptfs -reverse` on the same
# machine, in the same run, on the same key config and the same source tree.
#
# Figures (issue 2's targets in brackets):
#   seq read   MB/s reading a 1 GiB file through a freshly mounted view, best of 3 [>= 4x gocryptfs]
#   find cold  s for `find VIEW -printf '%s %T@\n'` over ~60,000 entries      [<= gocryptfs, aim 3x]
#   find warm  the same walk again on the same mount
#   rsync      s for `rsync -a` of the 60k tree: plain source, snapveil view, gocryptfs view
#   peak RSS   VmHWM of the mount process after serving all of the above     [< 64 MB]
#
# Each view is mounted fresh per workload, so neither side is helped by the other's caches;
# the plaintext source is kept in the page cache for both, so the figures measure the
# filesystems, not the disk.
#
# Env: SNAPVEIL_BIN (default target/release/snapveil), BENCH_DIR (default /var/tmp/snapveil-bench),
#      BENCH_SIZE_MIB (default 1024), BENCH_FILES (default 60000), BENCH_ROUNDS (default 3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
DIR=${BENCH_DIR:-/var/tmp/snapveil-bench}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
NFILES=${BENCH_FILES:-60000}
ROUNDS=${BENCH_ROUNDS:-3}
[[ -x $BIN ]] || { echo "bench: $BIN missing: run 'cargo build --release'" >&2; exit 1; }
command -v gocryptfs >/dev/null || { echo "bench: gocryptfs missing (scripts/install-deps.sh)" >&2; exit 1; }

PIDS=()
cleanup() {
    set +e
    for m in "$DIR"/mnt-*; do
        [[ -d $m ]] && mountpoint -q "$m" && fusermount3 -u "$m" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
rm -rf "$DIR"
mkdir -p "$DIR/big" "$DIR/tree" "$DIR/keys"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

echo "bench: preparing ${SIZE_MIB} MiB file and ${NFILES}-file tree in $DIR"
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$DIR/big/data.bin"
python3 - "$DIR/tree" "$NFILES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = 100
for i in range(n):
    d = os.path.join(root, f"d{i // per // 20:03d}", f"s{i // per:04d}")
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file-{i:06d}.txt"), "wb") as f:
        f.write(b"x" * (i % 3000))
EOF
ENTRIES=$(find "$DIR/tree" | wc -l)
sync

KEY=$DIR/keys/bench.conf PASS=$DIR/keys/bench.pass
"$BIN" init --config "$KEY" --passfile "$PASS" --scrypt-n 10 >/dev/null

# mount_view KIND SRC MNT: starts a foreground mount, sets MOUNT_PID once it answers.
mount_view() {
    local kind=$1 src=$2 mnt=$3
    mkdir -p "$mnt"
    if [[ $kind == snapveil ]]; then
        "$BIN" mount --config "$KEY" --passfile "$PASS" "$src" "$mnt" 2>"$DIR/$kind.log" &
    else
        gocryptfs -q -fg -reverse -ro -config "$KEY" -passfile "$PASS" "$src" "$mnt" 2>"$DIR/$kind.log" &
    fi
    MOUNT_PID=$!
    PIDS+=("$MOUNT_PID")
    for _ in $(seq 300); do
        mountpoint -q "$mnt" && return 0
        kill -0 "$MOUNT_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench: $kind did not mount $mnt:" >&2
    cat "$DIR/$kind.log" >&2
    exit 1
}
unmount_view() {
    fusermount3 -u "$1"
    wait "$MOUNT_PID" 2>/dev/null || true
}
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }

declare -A READ FCOLD FWARM RSYNC RSS
for kind in snapveil gocryptfs; do
    peak=0
    # sequential read of the big file: best of BENCH_ROUNDS fresh mounts (other load on
    # the machine only ever makes a round slower)
    best=0
    for _ in $(seq "$ROUNDS"); do
        cat "$DIR/big/data.bin" >/dev/null
        mount_view "$kind" "$DIR/big" "$DIR/mnt-$kind"
        f=$(find "$DIR/mnt-$kind" -type f -size +1M | head -1)
        t0=$(now)
        dd if="$f" of=/dev/null bs=1M status=none
        t1=$(now)
        mbs=$(awk -v s="$(secs "$t0" "$t1")" -v m="$SIZE_MIB" 'BEGIN { printf "%.0f", m * 1.048576 / s }')
        ((mbs > best)) && best=$mbs
        r=$(hwm_kb "$MOUNT_PID"); ((r > peak)) && peak=$r
        unmount_view "$DIR/mnt-$kind"
    done
    READ[$kind]=$best

    # metadata walk, cold then warm, on a fresh mount
    find "$DIR/tree" -printf '%s %T@\n' >/dev/null
    mount_view "$kind" "$DIR/tree" "$DIR/mnt-$kind"
    t0=$(now); find "$DIR/mnt-$kind" -printf '%s %T@\n' >/dev/null; t1=$(now)
    FCOLD[$kind]=$(secs "$t0" "$t1")
    t0=$(now); find "$DIR/mnt-$kind" -printf '%s %T@\n' >/dev/null; t1=$(now)
    FWARM[$kind]=$(secs "$t0" "$t1")
    r=$(hwm_kb "$MOUNT_PID"); ((r > peak)) && peak=$r
    unmount_view "$DIR/mnt-$kind"

    # rsync of the tree through a fresh mount, to an empty local directory
    mount_view "$kind" "$DIR/tree" "$DIR/mnt-$kind"
    rm -rf "$DIR/dest"
    t0=$(now); rsync -a "$DIR/mnt-$kind/" "$DIR/dest/"; t1=$(now)
    RSYNC[$kind]=$(secs "$t0" "$t1")
    r=$(hwm_kb "$MOUNT_PID"); ((r > peak)) && peak=$r
    unmount_view "$DIR/mnt-$kind"
    RSS[$kind]=$((peak / 1024))
done
rm -rf "$DIR/dest"
t0=$(now); rsync -a "$DIR/tree/" "$DIR/dest/"; t1=$(now)
RSYNC_PLAIN=$(secs "$t0" "$t1")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", (b > 0 ? a / b : 0) }'; }
echo
echo "snapveil $("$BIN" --version | awk '{print $2}') vs $(gocryptfs -version | head -1 | sed "s/;.*//"), $(nproc) cores"
printf '%-34s %12s %12s %10s\n' "" snapveil gocryptfs ratio
printf '%-34s %12s %12s %10s\n' "seq read ${SIZE_MIB} MiB (MB/s)" "${READ[snapveil]}" "${READ[gocryptfs]}" "$(ratio "${READ[snapveil]}" "${READ[gocryptfs]}")"
printf '%-34s %12s %12s %10s\n' "find ${ENTRIES} entries, cold (s)" "${FCOLD[snapveil]}" "${FCOLD[gocryptfs]}" "$(ratio "${FCOLD[gocryptfs]}" "${FCOLD[snapveil]}")"
printf '%-34s %12s %12s %10s\n' "find ${ENTRIES} entries, warm (s)" "${FWARM[snapveil]}" "${FWARM[gocryptfs]}" "$(ratio "${FWARM[gocryptfs]}" "${FWARM[snapveil]}")"
printf '%-34s %12s %12s %10s\n' "rsync -a of the tree (s)" "${RSYNC[snapveil]}" "${RSYNC[gocryptfs]}" "$(ratio "${RSYNC[gocryptfs]}" "${RSYNC[snapveil]}")"
printf '%-34s %12s %12s %10s\n' "peak RSS of the mount (MB)" "${RSS[snapveil]}" "${RSS[gocryptfs]}" ""
printf '%-34s %12s\n' "rsync -a of the plain tree (s)" "$RSYNC_PLAIN"
echo "(ratios: higher is better for snapveil; times are wall clock)"

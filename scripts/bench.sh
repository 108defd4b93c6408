#!/usr/bin/env bash
# bench.sh (`make bench`): snapveil against what a user would pick instead, on one tree, in
# one run (issue 13), and its encrypted view against `gocryptfs -reverse` (issue 2).
#
# The tree: BENCH_FILES files (default 100,000) of 100 B to 50 KB (skewed to small; ~1.5 GB
# at the default), in directories of 100, on a btrfs subvolume on a loop device, so that
# `snapveil run` backs up a real snapshot (source btrfs:) as a nightly job would.
#
# 1. Pipeline, local targets (each tool its own fresh ext4 on a loop device), warm page cache, three
#    phases: full (empty target), 1% of the files changed (rewritten, same size), nothing
#    changed. Per phase:
#      plain rsync   rsync -a --delete --backup --backup-dir=GEN  (no encryption: the limit)
#      restic        restic backup (repository on the same disk)
#      snapveil run  snapshot, encrypted view, rsync with generations, manifests, prune
#                    (after the first, only what changed: crate::changes)
#    After the full phase, plain rsync of a fresh snapshot of the tree (its pages cold, as
#    a run's are): the limit for snapveil's full run. Every timed tool starts with the
#    writes of the one before flushed (sync).
#    then `snapveil run --full` with nothing changed (the weekly full pass), snapveil only.
#    Seconds and the ratio to plain rsync; peak RSS of `snapveil run` (/usr/bin/time -v);
#    where the time of the full and the no-op run goes (the gaps between their log lines).
# 2. The encrypted view, each mounted fresh on the same key config:
#      read every file   `tar -cf - . | cat` of the tree: plain, snapveil, gocryptfs -reverse
#      seq read          MB/s of a BENCH_SIZE_MIB file, best of BENCH_ROUNDS fresh mounts
#      peak RSS          VmHWM of the mount process after the tar
# 3. With BENCH_MILLION=1: peak RSS of a full and then a no-op `snapveil run` over
#    1,000,000 files (100 B to 1 KB, to keep the disk small): how memory grows with the tree.
#
# Env: SNAPVEIL_BIN (default target/release/snapveil), BENCH_DIR (default
#      /var/tmp/snapveil-bench), BENCH_FILES (default 100000; e.g. 5000 for a quick check),
#      BENCH_SIZE_MIB (default 1024), BENCH_ROUNDS (default 3), BENCH_MILLION (default 0).
# Needs root (loop device, btrfs), restic, gocryptfs, rsync, btrfs-progs, GNU time.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
DIR=${BENCH_DIR:-/var/tmp/snapveil-bench}
NFILES=${BENCH_FILES:-100000}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
ROUNDS=${BENCH_ROUNDS:-3}
MILLION=${BENCH_MILLION:-0}
[[ -x $BIN ]] || { echo "bench: $BIN missing: run 'cargo build --release'" >&2; exit 1; }
for t in gocryptfs restic rsync mkfs.btrfs btrfs losetup /usr/bin/time python3; do
    command -v "$t" >/dev/null || { echo "bench: $t missing (make bench installs it)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "bench: needs root (loop device, btrfs)" >&2; exit 1; }

PIDS=()
LOOP=
TLOOPS=()
cleanup() {
    set +e
    for m in "$DIR"/mnt-*; do
        [[ -d $m ]] && mountpoint -q "$m" && fusermount3 -u "$m" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    if mountpoint -q "$DIR/fs" 2>/dev/null; then
        for s in "$DIR"/fs/.snapveil/*; do [[ -d $s ]] && btrfs -q subvolume delete "$s" >/dev/null 2>&1; done
        umount "$DIR/fs"
    fi
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    for t in "$DIR"/tgt-*; do mountpoint -q "$t" 2>/dev/null && umount "$t"; done
    for l in "${TLOOPS[@]}"; do losetup -d "$l"; done
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
rm -rf "$DIR"
mkdir -p "$DIR/fs" "$DIR/keys" "$DIR/big"
chmod 700 "$DIR/keys"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", (b > 0 ? a / b : 0) }'; }

# gen.py ROOT N MIN MAX: N files, sizes MIN..MAX skewed to small (u^2.2), 100 per directory.
cat >"$DIR/gen.py" <<'EOF'
import os, random, sys
root, n, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(13)
pool = os.urandom(1 << 17)
total = 0
for i in range(n):
    d = os.path.join(root, f"d{i // 5000:04d}", f"s{i // 100:06d}")
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    size = lo + int((hi - lo) * rng.random() ** 2.2)
    off = rng.randrange(0, len(pool) - size)
    with open(os.path.join(d, f"f{i:07d}.dat"), "wb") as f:
        f.write(pool[off:off + size])
    total += size
print(total)
EOF
# change.py ROOT: rewrites every 100th file with new bytes of the same size (1%).
cat >"$DIR/change.py" <<'EOF'
import os, sys
n = 0
for dirpath, _, files in sorted(os.walk(sys.argv[1])):
    for name in sorted(files):
        if int(name[1:8]) % 100 == 37:
            p = os.path.join(dirpath, name)
            size = os.path.getsize(p)
            with open(p, "r+b") as f:
                f.write(os.urandom(size))
            n += 1
print(n)
EOF

# The source: a btrfs subvolume on a loop device, big enough for the tree and its snapshots.
img_gib=$(( NFILES * 16 / 1000000 + 2 ))
((MILLION)) && img_gib=$(( img_gib + 4 ))
truncate -s "${img_gib}G" "$DIR/fs.img"
LOOP=$(losetup -f --show "$DIR/fs.img")
mkfs.btrfs -q "$LOOP" >/dev/null 2>&1
mount "$LOOP" "$DIR/fs"
btrfs -q subvolume create "$DIR/fs/src"
SRC=$DIR/fs/src
# The targets: each tool its own freshly made ext4 (fresh_fs NAME: mounted at
# $DIR/tgt-NAME). On the host's own (long-used) filesystem the writers' time went mostly
# into ext4's search for a free inode (find_inode_bit, recently_deleted), and grew from
# run to run; on one ext4 shared by the three, the tool that came after plain rsync had
# written the tree's 100,000 files paid for them (session 18: snapveil's first run
# 12.7 and 8.5 s into a fresh ext4, 15.2 and 19.9 s into one plain rsync had written).
fresh_fs() {
    local img=$DIR/tgt-$1.img l
    truncate -s "$(( img_gib * 4 ))G" "$img"
    l=$(losetup -f --show "$img")
    TLOOPS+=("$l")
    mkfs.ext4 -q "$l"
    mkdir -p "$DIR/tgt-$1"
    mount "$l" "$DIR/tgt-$1"
}
for t in plain restic snapveil cold; do fresh_fs "$t"; done
mkdir -p "$DIR/tgt-plain/current"
echo "bench: building ${NFILES} files in $SRC ..."
BYTES=$(python3 "$DIR/gen.py" "$SRC" "$NFILES" 100 50000)
MB=$(( BYTES / 1000000 ))
sync

KEY=$DIR/keys/bench.conf PASS=$DIR/keys/bench.pass
"$BIN" init --config "$KEY" --passfile "$PASS" --scrypt-n 10 >/dev/null 2>&1
printf 'bench-password\n' >"$DIR/keys/restic.pass"
chmod 600 "$DIR/keys/restic.pass"
export RESTIC_PASSWORD_FILE=$DIR/keys/restic.pass RESTIC_CACHE_DIR=$DIR/restic-cache
restic -q init -r "$DIR/tgt-restic/repo" >/dev/null

cat >"$DIR/snapveil.toml" <<EOF
state_dir = "$DIR/state"
[retention]
last = 100
[[job]]
name = "bench"
source = "btrfs:$SRC"
target = "$DIR/tgt-snapveil/target"
key_config = "$KEY"
passfile = "$PASS"
EOF

# Before each timed tool: the source's pages warm, and the writes of the tool before
# flushed, so that no tool's time includes another's writeback (restic writes its
# 1.5 GB repository just before snapveil's full run starts).
warm() { tar -C "$SRC" -cf - . | cat >/dev/null; sync; }
declare -A T
RSS_RUN=()
run_phase() {
    local phase=$1 t0 t1
    warm
    t0=$(now)
    rsync -a --delete --backup --backup-dir="$DIR/tgt-plain/generations/$phase" "$SRC/" "$DIR/tgt-plain/current/"
    t1=$(now); T[$phase,rsync]=$(secs "$t0" "$t1")
    warm
    t0=$(now)
    restic -q -r "$DIR/tgt-restic/repo" backup "$SRC" >/dev/null
    t1=$(now); T[$phase,restic]=$(secs "$t0" "$t1")
    warm
    t0=$(now)
    /usr/bin/time -v -o "$DIR/time-$phase.txt" "$BIN" run --config "$DIR/snapveil.toml" >/dev/null 2>"$DIR/run-$phase.log" \
        || { echo "bench: snapveil run failed ($phase):" >&2; tail -20 "$DIR/run-$phase.log" >&2; exit 1; }
    t1=$(now); T[$phase,snapveil]=$(secs "$t0" "$t1")
    RSS_RUN+=("$(awk '/Maximum resident/ { printf "%.1f", $NF / 1024 }' "$DIR/time-$phase.txt")")
    sleep 1 # the next run's stamp must be a later second
}
echo "bench: pipeline (full, 1% changed, no-op) ..."
run_phase full
# What a run reads is a fresh snapshot, whose files are other inodes than the source's:
# their pages are not in the cache warm() fills for plain rsync and restic. Plain rsync
# of such a snapshot is the limit for snapveil's full run.
btrfs -q subvolume snapshot -r "$SRC" "$DIR/fs/cold"
sync
t0=$(now)
rsync -a "$DIR/fs/cold/" "$DIR/tgt-cold/tree/"
t1=$(now); T[full,cold]=$(secs "$t0" "$t1")
btrfs -q subvolume delete "$DIR/fs/cold" >/dev/null
rm -rf "$DIR/tgt-cold/tree"
sync
CHANGED=$(python3 "$DIR/change.py" "$SRC")
run_phase changed
run_phase noop
# The full pass a run makes every full_every (7 days) or with --full, nothing changed:
# rsync over the whole freshly mounted view, as every run did before issue 13's index.
warm
t0=$(now)
"$BIN" run --full --config "$DIR/snapveil.toml" >/dev/null 2>"$DIR/run-fullpass.log" \
    || { echo "bench: snapveil run --full failed:" >&2; tail -20 "$DIR/run-fullpass.log" >&2; exit 1; }
t1=$(now); T[fullpass,snapveil]=$(secs "$t0" "$t1")

# 2. The view. mount_view KIND SRC MNT: a foreground mount; MOUNT_PID once it answers.
mount_view() {
    local kind=$1 src=$2 mnt=$3
    mkdir -p "$mnt"
    if [[ $kind == snapveil ]]; then
        "$BIN" mount --frozen --config "$KEY" --passfile "$PASS" "$src" "$mnt" 2>"$DIR/$kind.log" &
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
hwm_mb() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

echo "bench: reading every file: plain tree, snapveil view, gocryptfs -reverse ..."
# A read-only snapshot is what a run reads: the views get the same frozen source.
btrfs -q subvolume snapshot -r "$SRC" "$DIR/fs/ro"
# The snapshot's files are other inodes than the source's: warm their pages too, so all
# three read the same plaintext from memory.
tar -C "$DIR/fs/ro" -cf - . | cat >/dev/null
t0=$(now); tar -C "$DIR/fs/ro" -cf - . | cat >/dev/null; t1=$(now)
TAR_PLAIN=$(secs "$t0" "$t1")
declare -A TAR READ RSS
for kind in snapveil gocryptfs; do
    tar -C "$DIR/fs/ro" -cf - . | cat >/dev/null
    mount_view "$kind" "$DIR/fs/ro" "$DIR/mnt-$kind"
    t0=$(now); tar -C "$DIR/mnt-$kind" -cf - . | cat >/dev/null; t1=$(now)
    TAR[$kind]=$(secs "$t0" "$t1")
    RSS[$kind]=$(hwm_mb "$MOUNT_PID")
    unmount_view "$DIR/mnt-$kind"
done
btrfs -q subvolume delete "$DIR/fs/ro" >/dev/null

echo "bench: sequential read of a ${SIZE_MIB} MiB file ..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$DIR/big/data.bin"
for kind in snapveil gocryptfs; do
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
        unmount_view "$DIR/mnt-$kind"
    done
    READ[$kind]=$best
done
rm -f "$DIR/big/data.bin"

RSS_1M='' RSS_1M_NOOP=''
if ((MILLION)); then
    echo "bench: 1,000,000 files for the memory check ..."
    btrfs -q subvolume create "$DIR/fs/million"
    python3 "$DIR/gen.py" "$DIR/fs/million" 1000000 100 1000 >/dev/null
    sed -e "s|btrfs:$SRC|btrfs:$DIR/fs/million|" -e "s|$DIR/tgt-snapveil/target|$DIR/tgt-snapveil/target-million|" \
        -e 's|name = "bench"|name = "million"|' "$DIR/snapveil.toml" >"$DIR/million.toml"
    /usr/bin/time -v -o "$DIR/time-million.txt" "$BIN" run --config "$DIR/million.toml" >/dev/null 2>"$DIR/run-million.log" \
        || { echo "bench: snapveil run failed (1M):" >&2; tail -20 "$DIR/run-million.log" >&2; exit 1; }
    RSS_1M=$(awk '/Maximum resident/ { printf "%.1f", $NF / 1024 }' "$DIR/time-million.txt")
    sleep 1 # the next run's stamp must be a later second
    /usr/bin/time -v -o "$DIR/time-million-noop.txt" "$BIN" run --config "$DIR/million.toml" >/dev/null 2>"$DIR/run-million-noop.log" \
        || { echo "bench: snapveil run failed (1M, no-op):" >&2; tail -20 "$DIR/run-million-noop.log" >&2; exit 1; }
    RSS_1M_NOOP=$(awk '/Maximum resident/ { printf "%.1f", $NF / 1024 }' "$DIR/time-million-noop.txt")
fi

echo
echo "snapveil $("$BIN" --version | awk '{print $2}'), $(rsync --version | head -1 | awk '{print "rsync " $3}'), $(restic version | awk '{print "restic " $2}'), $(gocryptfs -version | head -1 | sed "s/;.*//"), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "tree: $NFILES files, $MB MB, btrfs on a loop device; each tool's target on a fresh ext4 of its own; warm page cache"
printf '%-22s %9s %9s %9s %11s %11s\n' "" "rsync" "restic" "snapveil" "restic/rs" "snapveil/rs"
for phase in full changed noop; do
    case $phase in full) label="full (s)";; changed) label="1% changed (s)";; noop) label="nothing changed (s)";; esac
    printf '%-22s %9s %9s %9s %11s %11s\n' "$label" "${T[$phase,rsync]}" "${T[$phase,restic]}" "${T[$phase,snapveil]}" \
        "$(ratio "${T[$phase,restic]}" "${T[$phase,rsync]}")" "$(ratio "${T[$phase,snapveil]}" "${T[$phase,rsync]}")"
done
printf '%-22s %9s %9s %9s %11s %11s\n' "full, fresh snapshot" "${T[full,cold]}" "-" "${T[full,snapveil]}" \
    "" "$(ratio "${T[full,snapveil]}" "${T[full,cold]}")"
printf '%-22s %9s %9s %9s %11s %11s\n' "nothing, --full (s)" "${T[noop,rsync]}" "-" "${T[fullpass,snapveil]}" \
    "" "$(ratio "${T[fullpass,snapveil]}" "${T[noop,rsync]}")"
echo "(1% changed = $CHANGED files rewritten, same size; fresh snapshot = plain rsync of a new snapshot, whose"
echo " pages are cold as a run's are; --full = the weekly full pass, see full_every)"
printf '%-36s %s MiB (full), %s MiB (1%%), %s MiB (no-op)\n' "peak RSS of snapveil run, ${NFILES} files" "${RSS_RUN[0]}" "${RSS_RUN[1]}" "${RSS_RUN[2]}"
if [[ -n $RSS_1M ]]; then printf '%-36s %s MiB (full), %s MiB (no-op)\n' "peak RSS of snapveil run, 1M files" "$RSS_1M" "$RSS_1M_NOOP"; fi
echo
printf '%-36s %10s %10s %10s\n' "" plain snapveil gocryptfs
printf '%-36s %10s %10s %10s\n' "read every file, tar | cat (s)" "$TAR_PLAIN" "${TAR[snapveil]}" "${TAR[gocryptfs]}"
printf '%-36s %10s %10s %10s\n' "  ratio to the plain tree" "1.0x" "$(ratio "${TAR[snapveil]}" "$TAR_PLAIN")" "$(ratio "${TAR[gocryptfs]}" "$TAR_PLAIN")"
printf '%-36s %10s %10s %10s\n' "seq read ${SIZE_MIB} MiB (MB/s), best of $ROUNDS" "" "${READ[snapveil]}" "${READ[gocryptfs]}"
printf '%-36s %10s %10s %10s\n' "  snapveil / gocryptfs" "" "$(ratio "${READ[snapveil]}" "${READ[gocryptfs]}")" ""
printf '%-36s %10s %10s %10s\n' "peak RSS of the mount after tar (MiB)" "" "${RSS[snapveil]}" "${RSS[gocryptfs]}"
echo
for phase in full changed noop; do
    echo "where the $phase snapveil run spends its time (gaps between log lines, > 0.05 s):"
    awk '/^[0-9][0-9][0-9][0-9]-/ {
        split($1, a, "T"); split(a[2], b, ":"); sub("Z", "", b[3]);
        t = b[1] * 3600 + b[2] * 60 + b[3];
        if (seen && t - prev > 0.05) printf "  %6.2f s  before: %s\n", t - prev, substr($0, index($0, ": ") + 2, 100);
        prev = t; seen = 1
    }' "$DIR/run-$phase.log"
done

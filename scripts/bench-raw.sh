#!/usr/bin/env bash
# bench-raw.sh (`make bench-raw`): raw ZFS mode against `zfs send` itself (issue 15).
#
# On one dataset of BENCH_RAW_MIB MiB of incompressible files in a zfs-fuse pool on a
# file (the host has no ZFS kernel module; the guest's OpenZFS runs under TCG emulation,
# where no timing means anything), the full stream of one snapshot:
#   zfs send > /dev/null                 what the source can give (the limit)
#   zfs send | zfs receive               the plain replica: the time to beat by at most 10%
#   zfs send | age -r KEY > file         stock age on the same stream
#   zfs send | gpg --symmetric > file    gpg (AES256, no compression) on the same stream
#   snapveil run, zfs-raw job, age recipient, directory target
#                                        snapshot, send, age, sha1, record: the product
# Seconds, MB/s and the ratio to `zfs send | zfs receive`, best of BENCH_ROUNDS; then
# snapveil's age encryption alone on one core (benches/age.rs), which must not be the
# bottleneck (issue: at least 1 GB/s).
#
# Env: SNAPVEIL_BIN (default target/release/snapveil), BENCH_DIR (default
#      /var/tmp/snapveil-bench-raw), BENCH_RAW_MIB (default 1024), BENCH_ROUNDS (default 3).
# Needs root, zfs-fuse, age, gpg.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
DIR=${BENCH_DIR:-/var/tmp/snapveil-bench-raw}
MIB=${BENCH_RAW_MIB:-1024}
ROUNDS=${BENCH_ROUNDS:-3}
POOL=svbenchraw
[[ -x $BIN ]] || { echo "bench-raw: $BIN missing: run 'cargo build --release'" >&2; exit 1; }
for t in zfs zpool zfs-fuse age age-keygen gpg; do
    command -v "$t" >/dev/null || { echo "bench-raw: $t missing (make bench-raw installs it)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "bench-raw: needs root (zfs-fuse)" >&2; exit 1; }

STARTED=
cleanup() {
    set +e
    zpool destroy -f "$POOL" 2>/dev/null
    [[ -n $STARTED ]] && kill "$STARTED" 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM
zpool list "$POOL" >/dev/null 2>&1 && zpool destroy -f "$POOL"
rm -rf "$DIR"
mkdir -p "$DIR/keys" "$DIR/out" "$DIR/target"
chmod 700 "$DIR/keys"
if ! zpool list >/dev/null 2>&1; then
    zfs-fuse --no-kstat-mount -p "$DIR/zfs-fuse.pid"
    for _ in $(seq 100); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
    STARTED=$(cat "$DIR/zfs-fuse.pid")
fi

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

truncate -s $(( MIB * 4 + 1024 ))M "$DIR/pool.img"
zpool create -m "$DIR/mnt" "$POOL" "$DIR/pool.img"
zfs create -o compression=off "$POOL/src"
echo "bench-raw: writing $MIB MiB of random files ..."
for ((i = 0; i < MIB / 64; i++)); do
    head -c 64M /dev/urandom >"$DIR/mnt/src/f$i"
done
sync
zfs snapshot "$POOL/src@bench"
STREAM_BYTES=$(zfs send "$POOL/src@bench" | wc -c)

age-keygen -o "$DIR/keys/age.txt" 2>/dev/null
chmod 600 "$DIR/keys/age.txt"
RECIPIENT=$(age-keygen -y "$DIR/keys/age.txt")
printf 'bench-password\n' >"$DIR/keys/gpg.pass"
chmod 600 "$DIR/keys/gpg.pass"
"$BIN" init --config "$DIR/keys/key.conf" --passfile "$DIR/keys/key.pass" --scrypt-n 10 >/dev/null 2>&1
cat >"$DIR/snapveil.toml" <<EOF
state_dir = "$DIR/state"

[[job]]
name = "raw"
mode = "zfs-raw"
source = "zfs:$POOL/src"
target = "$DIR/target"
key_config = "$DIR/keys/key.conf"
passfile = "$DIR/keys/key.pass"
age_recipients = ["$RECIPIENT"]
EOF

# best LABEL CMD...: the best of ROUNDS wall times of CMD (a shell line), in seconds.
declare -A BEST
best() {
    local label=$1 line=$2 b='' t0 t1 s
    for ((r = 0; r < ROUNDS; r++)); do
        [[ -n ${BENCH_BEFORE:-} ]] && eval "$BENCH_BEFORE"
        t0=$(now)
        eval "$line"
        t1=$(now)
        s=$(secs "$t0" "$t1")
        if [[ -z $b ]] || awk -v a="$s" -v b="$b" 'BEGIN { exit !(a < b) }'; then b=$s; fi
    done
    BEST[$label]=$b
}

S="$POOL/src@bench"
best send "zfs send $S >/dev/null"
BENCH_BEFORE="zfs destroy -r $POOL/recv 2>/dev/null || true" \
    best receive "zfs send $S | zfs receive -u $POOL/recv"
zfs destroy -r "$POOL/recv"
best age "zfs send $S | age -r $RECIPIENT >$DIR/out/s.age"
best gpg "zfs send $S | gpg -q --batch --pinentry-mode loopback --passphrase-file $DIR/keys/gpg.pass --symmetric --cipher-algo AES256 --compress-algo none -o - >$DIR/out/s.gpg"
rm -f "$DIR/out/"*
# Each round a full stream to an empty target (and no snapshot of the job left behind).
BENCH_BEFORE="rm -rf $DIR/target/* $DIR/state; zfs list -H -o name -t snapshot -r $POOL/src | { grep @snapveil- || true; } | while read -r s; do zfs release snapveil-raw \$s 2>/dev/null; zfs destroy \$s; done" \
    best snapveil "\"$BIN\" run --config $DIR/snapveil.toml raw >/dev/null 2>$DIR/run.log || { cat $DIR/run.log >&2; exit 1; }"
SENT=$(find "$DIR/target/streams" -name '*.zfs.age' -printf '%s\n' | head -1)

mbs() { awk -v b="$STREAM_BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1e6 }'; }
rat() { awk -v a="$1" -v b="${BEST[receive]}" 'BEGIN { printf "%.2fx", a / b }'; }
echo
echo "snapveil $("$BIN" --version | awk '{print $2}'), zfs-fuse $(dpkg-query -W -f='${Version}' zfs-fuse), $(age --version | head -1 | sed 's/^/age /'), $(gpg --version | head -1), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "dataset: $MIB MiB of random files, full stream $(( STREAM_BYTES / 1000000 )) MB; best of $ROUNDS"
printf '%-44s %8s %8s %12s\n' "" "s" "MB/s" "/send|recv"
for k in send receive age gpg snapveil; do
    case $k in
        send) l="zfs send > /dev/null" ;;
        receive) l="zfs send | zfs receive (the limit)" ;;
        age) l="zfs send | age -r (stock age)" ;;
        gpg) l="zfs send | gpg --symmetric AES256" ;;
        snapveil) l="snapveil run (zfs-raw, age, directory)" ;;
    esac
    printf '%-44s %8s %8s %12s\n' "$l" "${BEST[$k]}" "$(mbs "${BEST[$k]}")" "$(rat "${BEST[$k]}")"
done
echo "snapveil's stream file: $(( ${SENT:-0} / 1000000 )) MB (age adds 16 bytes per 64 KiB chunk)"
echo
bench_bin=
for f in "$REPO"/target/release/deps/age-*; do
    [[ -x $f && $f != *.d && ( -z $bench_bin || $f -nt $bench_bin ) ]] && bench_bin=$f
done
if [[ -n $bench_bin ]]; then
    "$bench_bin"
else
    echo "(age alone: run 'cargo bench --bench age')"
fi

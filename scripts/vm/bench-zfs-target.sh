#!/usr/bin/env bash
# bench-zfs-target.sh (`make bench-zfs-target`): raw ZFS mode to a `zfs://` target against
# the pipe it replaces (issue 15), on real OpenZFS in the qemu guest.
#
# The host's zfs-fuse cannot serve a zfs:// target (no native encryption, no `guid`,
# no `receive -s`), so this runs in the guest of the real-kernel tier. The guest is
# emulated (TCG): absolute figures mean nothing, but the three lines run the same send
# on the same emulated machine, one after the other, so their RATIOS say what snapveil
# adds:
#   zfs send -w | zfs receive                          the local replica
#   zfs send -w | ssh backuphost zfs receive -s -u     the pipe syncoid-style tools run
#   zfs send -w | cat | ssh backuphost zfs receive     one more process in the pipe
#   snapveil run, zfs-raw job to zfs://backuphost/…    the product: snapshot, hold,
#                                                      guid-matched base, the same pipe
# on one natively encrypted dataset of BENCH_MIB MiB of random files (full streams, best
# of BENCH_ROUNDS rounds that interleave the lines). ssh is multiplexed
# (ControlMaster), as a nightly job's would be. Each command of the last snapveil run is
# listed with its time (its debug log), and the transfer alone is set against the pipe.
#
# Env: SNAPVEIL_BIN (default target/release/snapveil), BENCH_MIB (default 256),
#      BENCH_ROUNDS (default 3), and vmlib.sh's SNAPVEIL_VM_* settings.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=vmlib.sh
. "$HERE/vmlib.sh"
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
MIB=${BENCH_MIB:-256}
ROUNDS=${BENCH_ROUNDS:-3}
[[ -x $BIN ]] || vm_die "$BIN is missing: run \`cargo build --release\` (or set SNAPVEIL_BIN)"

GUEST=$("$HERE/build-guest.sh") || vm_die "building the guest failed"
vm_rundir
install -D -m 755 "$BIN" "$VM_RUN/share/bin/snapveil"

# The guest's part (the share is the guest's /mnt/host): runs there as root.
cat >"$VM_RUN/share/bench.sh" <<'GUEST'
set -euo pipefail
cd "$(mktemp -d)"
SV=/mnt/host/bin/snapveil
modprobe zfs
zpool create -f -O mountpoint=none src /dev/disk/by-id/virtio-zbsrc
zpool create -f -O mountpoint=none dst /dev/disk/by-id/virtio-zbdst
printf 'bench passphrase' >key
zfs create -o encryption=on -o keyformat=passphrase -o keylocation=file://$PWD/key \
    -o compression=off -o mountpoint=/srcdata src/data
for ((i = 0; i < MIB / 16; i++)); do head -c 16M /dev/urandom >/srcdata/f$i; done
sync
zfs snapshot src/data@bench
BYTES=$(zfs send -w src/data@bench | wc -c)

ssh-keygen -q -t ed25519 -N '' -f hostkey && ssh-keygen -q -t ed25519 -N '' -f id
mkdir -p /root/.ssh /run/sshd && cat id.pub >>/root/.ssh/authorized_keys
printf '%s\n' 'Port 2222' 'ListenAddress 127.0.0.1' "HostKey $PWD/hostkey" "PidFile $PWD/sshd.pid" \
    'PermitRootLogin prohibit-password' 'UsePAM no' 'PasswordAuthentication no' >sshd_config
/usr/sbin/sshd -f sshd_config
printf '%s\n' 'Host backuphost' '  HostName 127.0.0.1' '  Port 2222' "  IdentityFile $PWD/id" \
    '  IdentitiesOnly yes' '  StrictHostKeyChecking no' '  UserKnownHostsFile /dev/null' \
    '  BatchMode yes' '  LogLevel ERROR' '  ControlMaster auto' "  ControlPath $PWD/ssh-%C" \
    '  ControlPersist 600' >/etc/ssh/ssh_config.d/zz-snapveil-bench.conf
trap 'ssh -O exit backuphost 2>/dev/null; kill $(cat sshd.pid); rm -f /etc/ssh/ssh_config.d/zz-snapveil-bench.conf; zpool destroy -f src; zpool destroy -f dst' EXIT
ssh backuphost true

cat >c.toml <<EOF
state_dir = "$PWD/state"

[[job]]
name = "bench"
mode = "zfs-raw"
source = "zfs:src/data"
target = "zfs://backuphost/dst/c"
EOF

now() { date +%s.%N; }
# timed LABEL BEFORE LINE: one wall time of LINE (BEFORE run untimed first), kept in
# BEST[LABEL] if it is the best so far. The rounds interleave the lines, so that a
# slow spell of the emulated machine hits each of them alike.
declare -A BEST
timed() {
    local t0 s
    eval "$2"
    t0=$(now)
    eval "$3"
    s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
    printf '  round %d: %-9s %8s s\n' "$((r + 1))" "$1" "$s" >&2
    if [[ -z ${BEST[$1]:-} ]] || awk -v a="$s" -v b="${BEST[$1]}" 'BEGIN { exit !(a < b) }'; then
        BEST[$1]=$s
    fi
}
clear_c() {
    zfs destroy -r dst/c 2>/dev/null || true
    rm -rf state
    zfs list -H -o name -t snapshot src/data | { grep @snapveil-bench- || true; } |
        while read -r s; do zfs release snapveil-bench "$s" 2>/dev/null || true; zfs destroy "$s"; done
}
for ((r = 0; r < ROUNDS; r++)); do
    timed local "zfs destroy -r dst/a 2>/dev/null || true" "zfs send -w src/data@bench | zfs receive -u dst/a"
    timed ssh "zfs destroy -r dst/b 2>/dev/null || true" "zfs send -w src/data@bench | ssh backuphost zfs receive -s -u dst/b"
    timed hop "zfs destroy -r dst/d 2>/dev/null || true" "zfs send -w src/data@bench | cat | ssh backuphost zfs receive -s -u dst/d"
    timed snapveil clear_c "SNAPVEIL_LOG=snapveil=debug $SV run --config c.toml bench >/dev/null 2>run.log || { cat run.log >&2; exit 1; }"
done
grep -q 'sending a full stream' run.log
[[ $(zfs get -H -o value keystatus dst/c) == unavailable ]]

rat() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
echo
echo "snapveil $($SV --version | awk '{print $2}'), OpenZFS $(cat /sys/module/zfs/version), guest under TCG emulation: ratios only"
echo "dataset: $MIB MiB of random files, natively encrypted; raw full stream $((BYTES / 1000000)) MB; best of $ROUNDS"
printf '%-52s %8s %10s\n' "" "s" "/ssh pipe"
printf '%-52s %8s %10s\n' "zfs send -w | zfs receive (local)" "${BEST[local]}" "$(rat "${BEST[local]}" "${BEST[ssh]}")"
printf '%-52s %8s %10s\n' "zfs send -w | ssh backuphost zfs receive -s -u" "${BEST[ssh]}" "1.00x"
printf '%-52s %8s %10s\n' "zfs send -w | cat | ssh backuphost zfs receive -s -u" "${BEST[hop]}" "$(rat "${BEST[hop]}" "${BEST[ssh]}")"
printf '%-52s %8s %10s\n' "snapveil run (zfs-raw to zfs://backuphost/dst/c)" "${BEST[snapveil]}" "$(rat "${BEST[snapveil]}" "${BEST[ssh]}")"
echo
echo "where the last snapveil run spent its time (each command, from its debug log):"
sed 's/\x1b\[[0-9;]*m//g' run.log | awk -v pipe="${BEST[ssh]}" '
    /command finished|child finished/ {
        ms = $0; sub(/.*elapsed_ms=/, "", ms); sub(/[^0-9].*/, "", ms)
        c = $0; if (c ~ /cmd=/) { sub(/.*cmd=/, "", c) } else { sub(/.*cmd\{cmd=/, "", c) }
        sub(/ (exit|elapsed_ms)=.*/, "", c); sub(/}.*/, "", c)
        printf "  %7.2f s  %s\n", ms / 1000, substr(c, 1, 90)
        # The two sides of the stream run at once: the transfer is the longer one.
        if (c ~ /zfs send |zfs receive -s/) { if (ms > xfer) xfer = ms } else other += ms
    }
    END {
        printf "  the transfer (zfs send -w | ssh ... zfs receive -s -u): %.2f s, %.2fx the ssh pipe\n", xfer / 1000, xfer / 1000 / pipe
        printf "  every other command, one after the other: %.2f s\n", other / 1000
    }'
GUEST
vm_start "$GUEST" zbsrc:$((MIB * 3 + 512))M zbdst:$((MIB * 8 + 1024))M
vm_wait || vm_die "the guest did not boot"
vm_ssh env MIB="$MIB" ROUNDS="$ROUNDS" bash /mnt/host/bench.sh </dev/null
vm_stop

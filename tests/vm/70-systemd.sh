#!/usr/bin/env bash
# The Debian package run for real by systemd (PID 1 of the guest): README's install block
# line by line as written (dpkg -i, snapveil init, the config, check-config, systemctl
# start/enable, list-timers, journalctl, status, the Prometheus textfile); a ZFS job and an
# LVM job through snapveil.service and snapveil@JOB.service; `systemctl stop` during a
# transfer ends the run within TimeoutStopSec with the snapshot released and the view
# unmounted; a failing job fails its unit (OnFailure= fires) and snapveil.service; an
# upgrade to a rebuilt package and `dpkg -r` keep the config and the keys; purge says what
# it leaves. The packages are built on the host by test-vm.sh from the binary under test.
# disks: sdzfs:1G sdlvm:1G
# seconds: 278
. "$(dirname "$0")/lib.sh"
unset -f snapveil # README's lines run the installed /usr/bin/snapveil
P=sdpool VG=sdvg ST=/var/lib/snapveil CONF=/etc/snapveil/snapveil.toml KEYS=/etc/snapveil/keys
DEB_DIR=$SHARE/deb UPGRADE_DIR=$SHARE/deb-upgrade

cleanup() {
    systemctl stop snapveil.timer snapveil@home.timer 'snapveil@*.service' snapveil.service >/dev/null 2>&1
    [[ -x /usr/bin/snapveil && -f $CONF ]] && /usr/bin/snapveil cleanup >/dev/null 2>&1
    dpkg --purge snapveil >/dev/null 2>&1
    rm -rf /etc/systemd/system/snapveil@.service.d /etc/systemd/system/sv-alert@.service /run/sv-alert
    systemctl daemon-reload
    mountpoint -q /mnt/sd-db && umount /mnt/sd-db
    vgremove -f -y $VG >/dev/null 2>&1
    zpool destroy -f $P 2>/dev/null
    rm -rf /etc/snapveil $ST /srv/backup
    true
}
trap cleanup EXIT

# config [DB_JOB_EXTRA] [MORE_JOBS]: the file `$EDITOR` (README) puts in place.
config() {
    cat >"$PWD/snapveil.toml" <<EOF
state_dir = "$ST"

[[job]]
name = "home"
source = "zfs:$P/home"
target = "/srv/backup/home"
key_config = "$KEYS/home.conf"
passfile = "$KEYS/home.pass"

[[job]]
name = "db"
source = "lvm:$VG/db"
target = "/srv/backup/db"
key_config = "$KEYS/db.conf"
passfile = "$KEYS/db.pass"
${1:-}
[job.snapshot]
size = "64M"
${2:-}
EOF
}
ours() { zfs list -H -o name -t all -r $P | grep snapveil- || true; lvs --noheadings -o lv_name $VG | grep snapveil- || true; }
# left: nothing of ours is left (no snapshot, no mount under the state directory); else it
# names what is, for the failure's output
left() {
    local o m
    o=$(ours) m=$(grep " $ST/" /proc/self/mountinfo)
    [ -z "$o$m" ] || { echo "left behind: ${o:+snapshots: $o }${m:+mounts: $m}"; return 1; }
}
cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
# the log of UNIT since CURSOR, message text only
log_since() { journalctl -u "$1" --after-cursor "$2" -o cat --no-pager; }
# in_order FILE PATTERN...: each pattern's first match comes after the previous one's
in_order() {
    local f=$1 last=0 n p
    shift
    for p in "$@"; do
        n=$(grep -n -m1 -e "$p" "$f" | cut -d: -f1)
        [[ -n $n ]] && ((n > last)) || { echo "'$p' missing or out of order in $f"; return 1; }
        last=$n
    done
}

check "PID 1 is systemd and systemctl works over ssh" \
    "[ \"\$(ps -o comm= -p 1)\" = systemd ] && systemctl is-system-running --wait | grep -E -q 'running|degraded'"
check "setup: pool with dataset home, LV db with ext4, both with data" "
    zpool create -f -O mountpoint=/$P $P $(disk sdzfs) && zfs create $P/home && random_tree /$P/home 2 &&
    pvcreate -q -y $(disk sdlvm) && vgcreate -q $VG $(disk sdlvm) && lvcreate -q -y -L 200M -n db $VG &&
    mkfs.ext4 -q /dev/$VG/db && mkdir -p /mnt/sd-db && mount /dev/$VG/db /mnt/sd-db && random_tree /mnt/sd-db 2"
config

# README's block, in order, each line as a user types it: from the directory holding the
# .deb, with $EDITOR standing for the admin writing the two jobs into the file. The db
# job's key is made the same way (README shows one key).
mapfile -t readme < <(awk '/<!-- tests\/vm\/70-systemd.sh runs this block/ { f = 1; next }
    f && /^```sh/ { next } f && /^```/ { exit } f' "$SHARE/README.md" | sed 's/[[:space:]]*#.*$//' | sed '/^$/d')
check "README has the install block (dpkg -i ... cat snapveil.prom)" \
    "[ ${#readme[@]} -ge 8 ] && printf '%s\n' \"\${readme[@]}\" | grep -q '^dpkg -i ' && printf '%s\n' \"\${readme[@]}\" | grep -q 'snapveil.prom'"
deb_name=$(basename "$(ls "$DEB_DIR"/snapveil_*.deb)")
check "README installs the package built here ($deb_name)" "printf '%s\n' \"\${readme[@]}\" | grep -qx 'dpkg -i $deb_name'"
export EDITOR="cp $PWD/snapveil.toml"
c0=$(cursor)
for line in "${readme[@]}"; do
    case $line in
    *snapveil.prom*) ;; # checked below, with the status
    *) check "README: $line" "cd $DEB_DIR && $line >$PWD/readme.out 2>&1 || { cat $PWD/readme.out; exit 1; }" ;;
    esac
    if [[ $line == snapveil\ init* ]]; then
        check "db job's key, like home's" "snapveil init --scrypt-n 12 --config $KEYS/db.conf --passfile $KEYS/db.pass >/dev/null"
    fi
done

check "installed: /etc/snapveil/keys 0700 and /var/lib/snapveil 0700 made by postinst, keys 0600" "
    [ \"\$(stat -c %a $KEYS)\" = 700 ] && [ \"\$(stat -c %a $ST)\" = 700 ] &&
    [ \"\$(stat -c %a $KEYS/home.conf)\" = 600 ] && [ \"\$(stat -c %a $KEYS/home.pass)\" = 600 ] &&
    dpkg-query -W -f '\${Conffiles}' snapveil | grep -q '$CONF' &&
    [ -f /usr/share/man/man8/snapveil-run.8.gz ] && [ -f /usr/share/bash-completion/completions/snapveil ]"
check "snapveil@home.service succeeded; its journal has one line per step, in order, no ANSI codes, no timestamps of ours" "
    systemctl show -p Result --value snapveil@home.service | grep -qx success &&
    log_since snapveil@home.service '$c0' >j.home && cat j.home &&
    ! grep -q \$'\\e' j.home && ! grep -E -q '^ *20[0-9]{2}-[0-9]{2}-[0-9]{2}T' j.home &&
    in_order j.home 'starting source=zfs' 'snapshot taken' 'encrypted view mounted' 'wrote current/ as the view was walked' \
        'encrypted view unmounted' 'snapshot released' 'finished result=success' && [ \"\$(grep -c -e 'snapshot taken' -e 'finished result=success' j.home)\" = 2 ]"
check "list-timers shows snapveil.timer (and snapveil@home.timer) with a next run" "
    systemctl list-timers --no-pager 'snapveil*' | tee lt && systemctl is-enabled snapveil.timer &&
    for t in snapveil.timer snapveil@home.timer; do
        [ -z \"\$(systemctl show -p Names --value \$t)\" ] && continue
        systemctl is-active -q \$t || continue
        grep -E -q \"^[A-Z][a-z]{2} [0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} [A-Z]+ .* \$t \" lt || exit 1
    done; grep -q ' snapveil.timer ' lt"

c1=$(cursor)
check "systemctl start snapveil.service: both jobs (ZFS and LVM) succeed, nothing left behind" "
    systemctl start snapveil.service && systemctl show -p Result --value snapveil.service | grep -qx success && left &&
    log_since snapveil.service '$c1' | grep -c 'finished result=success' | grep -qx 2"
check "status files and the Prometheus textfile under /var/lib/snapveil" "
    for j in home db; do grep -q '\"result\": \"success\"' $ST/status/\$j.json || exit 1; done &&
    grep -qx 'snapveil_last_run_success{job=\"home\"} 1' $ST/snapveil.prom &&
    grep -qx 'snapveil_last_run_success{job=\"db\"} 1' $ST/snapveil.prom &&
    grep -q '^snapveil_last_run_timestamp_seconds{job=\"db\"} ' $ST/snapveil.prom &&
    cat $ST/snapveil.prom | grep -q '^# TYPE snapveil_last_run_success gauge'"
check "README: cat /var/lib/snapveil/snapveil.prom, snapveil status (as written)" \
    "cat /var/lib/snapveil/snapveil.prom | grep -q 'job=\"db\"' && snapveil status | grep -E -q '^db +.*success'"
# systemctl stop in the middle of a slow transfer
head -c 8M /dev/urandom >/mnt/sd-db/big.bin
config 'rsync_args = ["--bwlimit=200"]'
cp "$PWD/snapveil.toml" $CONF
c2=$(cursor)
check "systemctl stop during a transfer: done within TimeoutStopSec, not by timeout; snapshot released, view unmounted" "
    systemctl start --no-block snapveil@db.service &&
    end=\$((\$(date +%s) + 120)) &&
    until pgrep -f 'rsync.*$ST/view/db' >/dev/null || [ \$(date +%s) -gt \$end ]; do sleep 0.3; done &&
    sleep 2 && mountpoint -q $ST/view/db && echo 'view mount visible on the host' && [ -n \"\$(ours)\" ] &&
    limit=\$(( \$(systemctl show -p TimeoutStopUSec --value snapveil@db.service | sed 's/min/*60/;s/s\$//') )) &&
    t0=\$(date +%s) && systemctl stop snapveil@db.service && took=\$(( \$(date +%s) - t0 )) &&
    echo \"stopped in \${took}s (TimeoutStopSec \${limit}s)\" && [ \$took -lt \$limit ] &&
    [ \"\$(systemctl show -p Result --value snapveil@db.service)\" != timeout ] &&
    ! systemctl is-active -q snapveil@db.service && log_since snapveil@db.service '$c2' >j.stop &&
    { left || { tail -n 25 j.stop; false; }; } &&
    grep -q 'snapshot released' j.stop && grep -q 'encrypted view unmounted' j.stop"
rm -f /mnt/sd-db/big.bin
systemctl reset-failed 'snapveil*' >/dev/null 2>&1

# A job that fails: its unit fails, OnFailure= fires, and so does the all-jobs unit.
config '' '[[job]]
name = "broken"
source = "zfs:'$P'/missing"
target = "/srv/backup/broken"
key_config = "'$KEYS'/db.conf"
passfile = "'$KEYS'/db.pass"'
cp "$PWD/snapveil.toml" $CONF
mkdir -p /etc/systemd/system/snapveil@.service.d
printf '[Unit]\nOnFailure=sv-alert@%%n.service\n' >/etc/systemd/system/snapveil@.service.d/alert.conf
printf '[Service]\nType=oneshot\nExecStart=/bin/sh -c "echo %%i >>/run/sv-alert"\n' >/etc/systemd/system/sv-alert@.service
systemctl daemon-reload
check "a failing job fails snapveil@broken.service, and OnFailure= fires" "
    ! systemctl start snapveil@broken.service && systemctl is-failed -q snapveil@broken.service &&
    for _ in \$(seq 50); do grep -q 'snapveil@broken.service' /run/sv-alert 2>/dev/null && break; sleep 0.2; done &&
    grep -q 'snapveil@broken.service' /run/sv-alert && left"
check "snapveil.service fails when one job fails; the other jobs still succeed" "
    ! systemctl start snapveil.service && systemctl is-failed -q snapveil.service &&
    grep -qx 'snapveil_last_run_success{job=\"broken\"} 0' $ST/snapveil.prom &&
    grep -qx 'snapveil_last_run_success{job=\"home\"} 1' $ST/snapveil.prom && left"
config
cp "$PWD/snapveil.toml" $CONF
systemctl reset-failed 'snapveil*' >/dev/null 2>&1

# Upgrade, remove, purge: the config (changed by the admin) and the keys stay.
sums() { sha256sum $CONF $KEYS/*; stat -c '%a %n' $KEYS $KEYS/*; }
sums >sums.before
new_deb=$(ls "$UPGRADE_DIR"/snapveil_*.deb)
check "upgrade to a rebuilt package ($(basename "$new_deb")): config and keys unchanged, timer still enabled" "
    dpkg -i $new_deb >/dev/null && dpkg-query -W -f '\${Version}' snapveil | grep -q 'vmtest1' &&
    sums | diff sums.before - && systemctl is-enabled -q snapveil.timer && systemctl is-active -q snapveil.timer &&
    zcat /usr/share/doc/snapveil/changelog.Debian.gz | head -1 | grep -q vmtest1 && /usr/bin/snapveil --version"
check "dpkg -r: binary gone; config, keys and state stay" "
    dpkg -r snapveil >/dev/null && [ ! -e /usr/bin/snapveil ] &&
    dpkg-query -W -f '\${Status}' snapveil | grep -q config-files &&
    sums | diff sums.before - && [ -f $ST/snapveil.prom ]"
check "dpkg --purge: says it leaves the keys and the state; they are still there" "
    dpkg --purge snapveil >purge.out 2>&1; cat purge.out &&
    grep -q 'leaves /etc/snapveil/keys' purge.out && grep -q 'leaves /var/lib/snapveil' purge.out &&
    [ \"\$(sha256sum $KEYS/home.conf $KEYS/home.pass)\" = \"\$(grep -E '^[0-9a-f]{64}  $KEYS/home' sums.before)\" ] &&
    [ \"\$(stat -c %a $KEYS)\" = 700 ] && [ -d $ST/status ]"

#!/usr/bin/env bash
# Raw ZFS mode to a zfs:// target (src/zfs_send/receive.rs) on real OpenZFS: a natively
# encrypted dataset sent raw over ssh into a second pool, received by an unprivileged
# `zfsbackup` user given the README's `zfs allow` line and authorized_keys options; full,
# then incremental; a transfer cut mid-stream resumed from its token; a resume whose
# snapshot was destroyed aborted with `zfs receive -A`; an increment from a bookmark;
# target retention (prune --dry-run, then for real) keeping the next base; restore with
# snapveil and with the README's stock line, equal to the source; a plain dataset
# refused with nothing sent. (ssh is multiplexed: a handshake costs
# seconds under TCG.)
# disks: zttank:1G ztpool2:1G
# seconds: 301
. "$(dirname "$0")/lib.sh"
KEYF=$PWD/zkey CFG=$PWD/c.toml README=$SHARE/README.md
SSHCONF=/etc/ssh/ssh_config.d/zz-snapveil-vmtest.conf
export SNAPVEIL_CONFIG=$CFG
cleanup() {
    ssh -O exit zfsbackup@backuphost 2>/dev/null
    [[ -f $PWD/sshd.pid ]] && kill "$(cat "$PWD/sshd.pid")" 2>/dev/null
    rm -f "$SSHCONF"
    zpool destroy -f tank 2>/dev/null
    zpool destroy -f pool2 2>/dev/null
    userdel -r zfsbackup 2>/dev/null
    true
}
trap cleanup EXIT
modprobe zfs

# readme_line START: the README's first line starting with START.
readme_line() { awk -v s="$1" 'index($0, s) == 1 { print; found = 1; exit } END { exit !found }' "$README"; }

# config [EXTRA...]: the README's job (to $OUT, default $CFG), plus EXTRA lines;
# $TOOLS, when set, is the [tools] table's body.
config() {
    {
        echo "state_dir = \"$PWD/state\""
        [[ -n ${TOOLS:-} ]] && printf '[tools]\n%s\n' "$TOOLS"
        echo
        echo "[[job]]"
        echo 'name = "db"'
        echo 'mode = "zfs-raw"'
        echo 'source = "zfs:tank/db"'
        echo 'target = "zfs://zfsbackup@backuphost/pool2/backup/db"'
        for l in "$@"; do echo "$l"; done
    } >"${OUT:-$CFG}"
}
on_target() { zfs list -H -o name -t snapshot -d 1 pool2/backup/db | sed 's/.*@//'; }
kept() { zfs list -H -o name -t snapshot -d 1 tank/db | sed -n 's/.*@snapveil-db-//p'; }
token() { zfs get -H -o value receive_resume_token pool2/backup/db; }

check "pools, a natively encrypted tank/db, sshd on 127.0.0.1:2222 for backuphost" \
    "zpool create -f -O mountpoint=/tank tank $(disk zttank) && zpool create -f -O mountpoint=none pool2 $(disk ztpool2) \
     && printf 'correct horse battery' >$KEYF && zfs create -o encryption=on -o keyformat=passphrase -o keylocation=file://$KEYF tank/db \
     && random_tree /tank/db 4 && echo PLAINTEXT-MARKER >/tank/db/marker \
     && ssh-keygen -q -t ed25519 -N '' -f $PWD/hostkey && ssh-keygen -q -t ed25519 -N '' -f $PWD/id \
     && mkdir -p /run/sshd && printf '%s\n' 'Port 2222' 'ListenAddress 127.0.0.1' 'HostKey $PWD/hostkey' 'PidFile $PWD/sshd.pid' \
        'StrictModes no' 'UsePAM no' 'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'LogLevel VERBOSE' >$PWD/sshd_config \
     && /usr/sbin/sshd -f $PWD/sshd_config -E $PWD/sshd.log \
     && printf '%s\n' 'Host backuphost' '  HostName 127.0.0.1' '  Port 2222' '  IdentityFile $PWD/id' '  IdentitiesOnly yes' \
        '  StrictHostKeyChecking no' '  UserKnownHostsFile /dev/null' '  BatchMode yes' '  LogLevel ERROR' \
        '  ControlMaster auto' '  ControlPath $PWD/ssh-%C' '  ControlPersist 120' >$SSHCONF"

! id zfsbackup 2>/dev/null || { echo "zfsbackup exists before the test: refusing to use it" >&2; exit 1; }
check "the README's receiving-host lines: an unprivileged zfsbackup user with zfs allow and a restricted key" \
    "eval \"\$(readme_line 'useradd ')\" && usermod -p '*' zfsbackup \
     && eval \"\$(readme_line 'zfs create -o mountpoint=none pool2/backup')\" \
     && eval \"\$(readme_line 'zfs allow -u zfsbackup ')\" \
     && opts=\$(readme_line 'restrict ssh-ed25519' | cut -d' ' -f1) && [ \"\$opts\" = restrict ] \
     && install -d -o zfsbackup -m 700 ~zfsbackup/.ssh && echo \"\$opts \$(cat $PWD/id.pub)\" >~zfsbackup/.ssh/authorized_keys \
     && chown zfsbackup ~zfsbackup/.ssh/authorized_keys && ssh zfsbackup@backuphost zfs list pool2/backup \
     && ! ssh zfsbackup@backuphost zfs snapshot tank/db@not-yours && ! zfs list tank/db@not-yours"

config
check "first run: a full raw stream received as zfsbackup; the target holds ciphertext only (keystatus unavailable)" \
    "snapveil run db 2>run1.log && grep -q 'sending a full stream' run1.log && [ \"\$(on_target | wc -l)\" = 1 ] \
     && [ \"\$(zfs get -H -o value encryption,keystatus pool2/backup/db | tr '\n' ' ')\" = 'aes-256-gcm unavailable ' ] \
     && [ \"\$(token)\" = - ]"

echo second >/tank/db/marker; rm -f /tank/db/etc/motd; sync
check "second run: the increment from the first, matched by guid; list and status show the target" \
    "snapveil run db 2>run2.log && grep -q 'sending the increment' run2.log && [ \"\$(on_target | wc -l)\" = 2 ] \
     && snapveil list db | tee list.out && grep -q \"\$(on_target | tail -n1).*the next increment's base\" list.out \
     && snapveil status | grep -E '^db +.* success +.* 2 ' && snapveil verify db"

# A dropped connection: this ssh passes the first MiB of the stream, then ends it.
printf '#!/bin/sh\nhead -c 1048576 | ssh "$@"\n' >cut-ssh && chmod +x cut-ssh
head -c 6M /dev/urandom >/tank/db/var/lib/app/big1.bin; sync
OUT=$PWD/cut.toml TOOLS="ssh = \"$PWD/cut-ssh\"" config
check "a transfer cut mid-stream fails the run, the target saves a resume token, the snapshot is kept" \
    "! snapveil run --config $PWD/cut.toml db 2>cut1.log && grep -q 'is kept: the target saved the interrupted receive' cut1.log \
     && [ \"\$(token)\" != - ] && [ \"\$(kept | wc -l)\" = 2 ]"
CUT1=$(kept | tail -n1)

check "the next run resumes from the token first, then sends its own increment" \
    "snapveil run db 2>resume.log && grep -q 'resuming it first' resume.log && grep -q 'interrupted receive is complete' resume.log \
     && [ \"\$(token)\" = - ] && on_target | grep -q snapveil-db-$CUT1 && [ \"\$(on_target | wc -l)\" = 4 ]"

head -c 6M /dev/urandom >/tank/db/var/lib/app/big2.bin; sync
check "a second cut, whose kept snapshot is then destroyed on the source" \
    "! snapveil run --config $PWD/cut.toml db 2>cut2.log && [ \"\$(token)\" != - ] \
     && CUT2=\$(kept | tail -n1) && zfs destroy tank/db@snapveil-db-\$CUT2"
check "a resume whose snapshot is gone: zfs receive -A on the target, said so, then a normal increment" \
    "snapveil run db 2>abort.log && grep -q 'the source no longer has what it started from' abort.log && grep -q 'zfs receive -A pool2/backup/db' abort.log \
     && grep -q 'sending the increment' abort.log && [ \"\$(token)\" = - ] && [ \"\$(on_target | wc -l)\" = 5 ]"

# Someone releases our hold and destroys the kept snapshot: its bookmark still matches by
# guid.
LAST=$(kept)
zfs release snapveil-db "tank/db@snapveil-db-$LAST"
zfs destroy "tank/db@snapveil-db-$LAST"
echo third >/tank/db/marker; head -c 1M /dev/urandom >/tank/db/var/lib/app/more.bin; sync
WANT=$(tree_digest /tank/db)
check "an increment from the bookmark of the destroyed base snapshot" \
    "snapveil run db 2>bm.log && grep -q 'from=tank/db#snapveil-db-$LAST' bm.log && [ \"\$(on_target | wc -l)\" = 6 ]"
SNAP=snapveil-db-$(kept)

check "snapveil restore (the README's line): the raw replica back into a new dataset, equal to the source" \
    "line=\$(readme_line 'snapveil restore db --snapshot snapveil-db-20261130T020000Z --into tank/db-restored') \
     && eval \"\${line//snapveil-db-20261130T020000Z/$SNAP}\" && zfs load-key -L file://$KEYF tank/db-restored \
     && zfs set mountpoint=/tank/db-restored tank/db-restored && zfs mount tank/db-restored \
     && [ \"\$(tree_digest /tank/db-restored)\" = $WANT ] \
     && [ \"\$(zfs get -H -o value guid tank/db-restored@$SNAP)\" = \"\$(zfs get -H -o value guid tank/db@$SNAP)\" ]"

check "the README's stock line (ssh ... zfs send -w | zfs receive -u) restores the same" \
    "zfs destroy -r tank/db-restored && line=\$(readme_line 'ssh zfsbackup@backuphost zfs send -w ') \
     && eval \"\${line//snapveil-db-20261130T020000Z/$SNAP}\" && zfs load-key -L file://$KEYF tank/db-restored \
     && zfs set mountpoint=/tank/db-restored tank/db-restored && zfs mount tank/db-restored \
     && [ \"\$(tree_digest /tank/db-restored)\" = $WANT ] && zfs destroy -r tank/db-restored"

config '[job.retention]' 'last = 2'
check "prune --dry-run shows the target's snapshots past the policy, and destroys nothing" \
    "snapveil prune db --dry-run | tee dry.out && [ \"\$(grep -c '^would destroy zfs://zfsbackup@backuphost/pool2/backup/db@' dry.out)\" = 4 ] \
     && grep -q \"^keep .*@$SNAP\" dry.out && [ \"\$(on_target | wc -l)\" = 6 ]"
check "a run prunes the target by the policy and keeps the base; the next run still sends an increment" \
    "snapveil run db 2>p1.log && [ \"\$(on_target | wc -l)\" = 2 ] && on_target | grep -q $SNAP \
     && snapveil run db 2>p2.log && grep -q 'sending the increment' p2.log && [ \"\$(on_target | wc -l)\" = 2 ] && snapveil verify db"

config
sed -i 's|zfs:tank/db|zfs:tank/plain|; s|pool2/backup/db|pool2/backup/plain|; s|"db"|"plain"|' "$CFG"
check "a plain dataset is refused for a zfs:// target: nothing sent, no snapshot left" \
    "zfs create tank/plain && echo x >/tank/plain/f && ! snapveil run plain 2>plain.log && grep -q 'never sends an unencrypted stream' plain.log \
     && [ -z \"\$(zfs list -H -t snapshot -r tank/plain)\" ] && ! zfs list pool2/backup/plain"

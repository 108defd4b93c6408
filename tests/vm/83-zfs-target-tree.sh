#!/usr/bin/env bash
# A recursive raw job to a zfs:// target on real OpenZFS: a tree (children inheriting the
# key, one child its own encryption root) sent `zfs send -w -R` over ssh, full then
# incremental; a replication stream cut in a child (the child's resume token resumed,
# the children after the cut sent again, then the next increment); `list` and `verify`
# naming the half-received tree; the tree restored with snapveil, each dataset equal to
# the source (guids, contents); a first stream cut in a child refused without `force`
# (nothing changed) and received over with it.
# disks: treezfs:1G treezfs2:1G
# seconds: 299
. "$(dirname "$0")/lib.sh"
K1=$PWD/k1 K2=$PWD/k2 CFG=$PWD/c.toml
SSHCONF=/etc/ssh/ssh_config.d/zz-snapveil-vmtree.conf
export SNAPVEIL_CONFIG=$CFG
cleanup() {
    ssh -O exit root@treehost 2>/dev/null
    [[ -f $PWD/sshd.pid ]] && kill "$(cat "$PWD/sshd.pid")" 2>/dev/null
    rm -f "$SSHCONF"
    zpool destroy -f ttank 2>/dev/null
    zpool destroy -f tpool2 2>/dev/null
    true
}
trap cleanup EXIT
modprobe zfs

# config NAME [EXTRA...]: a recursive job NAME from ttank/NAME to tpool2/backup/NAME.
config() {
    local name=$1
    shift
    {
        echo "state_dir = \"$PWD/state\""
        [[ -n ${TOOLS:-} ]] && printf '[tools]\n%s\n' "$TOOLS"
        echo
        echo "[[job]]"
        echo "name = \"$name\""
        echo 'mode = "zfs-raw"'
        echo "source = \"zfs:ttank/$name\""
        echo "target = \"zfs://root@treehost/tpool2/backup/$name\""
        for l in "$@"; do echo "$l"; done
        printf '[job.snapshot]\nrecursive = true\n'
    } >"${OUT:-$CFG}"
}
# snaps NAME [CHILD]: this job's snapshots on the target dataset (stamps).
snaps() { zfs list -H -o name -t snapshot -d 1 "tpool2/backup/$1${2:+/$2}" 2>/dev/null | sed -n "s/.*@snapveil-$1-//p"; }
tokens() { zfs get -H -r -t filesystem -o name,value receive_resume_token "tpool2/backup/$1" | awk '$2 != "-"' | wc -l; }
# tree NAME: ttank/NAME with logs (inherits the key), vault (its own key), zz (inherits).
tree() {
    zfs create -o encryption=on -o keyformat=passphrase -o keylocation="file://$K1" "ttank/$1" \
        && zfs create "ttank/$1/logs" \
        && zfs create -o encryption=on -o keyformat=passphrase -o keylocation="file://$K2" "ttank/$1/vault" \
        && zfs create "ttank/$1/zz" && echo top >"/ttank/$1/top" \
        && random_tree "/ttank/$1/logs" 3 && random_tree "/ttank/$1/vault" 3 && random_tree "/ttank/$1/zz" 3
}

check "pools, sshd on 127.0.0.1:2223 for treehost (root, a key of its own)" \
    "zpool create -f -O mountpoint=/ttank ttank $(disk treezfs) && zpool create -f -O mountpoint=none tpool2 $(disk treezfs2) \
     && zfs create -o mountpoint=none tpool2/backup && printf 'correct horse battery' >$K1 && printf 'another phrase here' >$K2 \
     && ssh-keygen -q -t ed25519 -N '' -f $PWD/hostkey && ssh-keygen -q -t ed25519 -N '' -f $PWD/id \
     && cp $PWD/id.pub $PWD/authorized_keys && mkdir -p /run/sshd \
     && printf '%s\n' 'Port 2223' 'ListenAddress 127.0.0.1' 'HostKey $PWD/hostkey' 'PidFile $PWD/sshd.pid' \
        'AuthorizedKeysFile $PWD/authorized_keys' 'PermitRootLogin prohibit-password' \
        'StrictModes no' 'UsePAM no' 'PasswordAuthentication no' 'KbdInteractiveAuthentication no' >$PWD/sshd_config \
     && /usr/sbin/sshd -f $PWD/sshd_config -E $PWD/sshd.log \
     && printf '%s\n' 'Host treehost' '  HostName 127.0.0.1' '  Port 2223' '  IdentityFile $PWD/id' '  IdentitiesOnly yes' \
        '  StrictHostKeyChecking no' '  UserKnownHostsFile /dev/null' '  BatchMode yes' '  LogLevel ERROR' \
        '  ControlMaster auto' '  ControlPath $PWD/ssh-%C' '  ControlPersist 120' >$SSHCONF \
     && ssh root@treehost zfs list tpool2/backup && tree app"

config app
check "first run: the tree in one raw replication stream; vault stays its own encryption root, no key on the target" \
    "snapveil run app 2>run1.log && grep -q 'sending a full stream' run1.log \
     && for c in '' logs vault zz; do [ \"\$(snaps app \$c | wc -l)\" = 1 ] || exit 1; done \
     && [ \"\$(zfs get -H -o value encryptionroot tpool2/backup/app/vault)\" = tpool2/backup/app/vault ] \
     && [ \"\$(zfs get -H -o value encryptionroot tpool2/backup/app/logs)\" = tpool2/backup/app ] \
     && [ \"\$(zfs get -H -o value keystatus tpool2/backup/app/vault)\" = unavailable ]"

echo two >/ttank/app/top; head -c 2M /dev/urandom >/ttank/app/zz/more.bin; sync
check "second run: the increment of the whole tree" \
    "snapveil run app 2>run2.log && grep -q 'sending the increment' run2.log \
     && for c in '' logs vault zz; do [ \"\$(snaps app \$c | wc -l)\" = 2 ] || exit 1; done && snapveil verify app"

# A dropped connection 1 MiB into the stream: DEST (a few KiB) is through, the first
# child (3 MiB of new data each) is cut.
printf '#!/bin/sh\nhead -c 1048576 | ssh "$@"\n' >cut-ssh && chmod +x cut-ssh
for c in logs vault zz; do head -c 3M /dev/urandom >/ttank/app/$c/cut.bin; done; sync
OUT=$PWD/cut.toml TOOLS="ssh = \"$PWD/cut-ssh\"" config app
check "a replication stream cut in a child: the run fails, a child holds the token, the snapshot is kept on the source" \
    "! snapveil run --config $PWD/cut.toml app 2>cut.log && grep -q 'is kept' cut.log \
     && [ \"\$(snaps app | wc -l)\" = 3 ] && [ \"\$(tokens app)\" = 1 ] \
     && [ \"\$(zfs get -H -o value receive_resume_token tpool2/backup/app)\" = - ] \
     && zfs list -H -t snapshot -d 1 ttank/app | grep -q \"\$(snaps app | tail -n1)\""
CUT=$(snaps app | tail -n1)

check "list and verify name the pending child receive and the children that lack the cut snapshot" \
    "snapveil list app | tee list.out && grep -q 'interrupted receive into tpool2/backup/app/' list.out \
     && grep -q \"lacks snapveil-app-$CUT\" list.out \
     && ! snapveil verify app >verify.out 2>&1 && grep -q 'pending' verify.out && grep -q 'half way' verify.out"

check "the next run resumes the child, sends the cut stream again for the rest, then its own increment" \
    "snapveil run app 2>fix.log && grep -q 'resuming it first' fix.log && grep -q 'sending it once more first' fix.log \
     && grep -q 'sending the increment' fix.log && [ \"\$(tokens app)\" = 0 ] \
     && for c in '' logs vault zz; do [ \"\$(snaps app \$c | wc -l)\" = 4 ] && snaps app \$c | grep -q $CUT || exit 1; done \
     && snapveil verify app"

SNAP=snapveil-app-$(snaps app | tail -n1)
check "snapveil restore: the tree back into a new dataset, every dataset the source's snapshot (guid) and contents" \
    "snapveil restore app --snapshot $SNAP --into ttank/app-restored \
     && for c in '' /logs /vault /zz; do [ \"\$(zfs get -H -o value guid ttank/app-restored\$c@$SNAP)\" = \"\$(zfs get -H -o value guid ttank/app\$c@$SNAP)\" ] || exit 1; done \
     && zfs load-key -L file://$K1 ttank/app-restored && zfs load-key -L file://$K2 ttank/app-restored/vault \
     && zfs set mountpoint=/restored ttank/app-restored && zfs mount -a \
     && [ \"\$(tree_digest /restored/vault)\" = \"\$(tree_digest /ttank/app/vault/.zfs/snapshot/$SNAP)\" ] \
     && [ \"\$(tree_digest /restored/zz)\" = \"\$(tree_digest /ttank/app/zz/.zfs/snapshot/$SNAP)\" ] \
     && zfs destroy -r ttank/app-restored"

# The first stream of another tree, cut in its first child: the children were never
# created on the target, and an increment cannot add them.
tree fresh
OUT=$PWD/cut.toml TOOLS="ssh = \"$PWD/cut-ssh\"" config fresh
config fresh
check "a first replication stream cut in a child: the next run is refused without force, nothing on the target changed" \
    "! snapveil run --config $PWD/cut.toml fresh 2>fcut.log && grep -q 'is kept' fcut.log \
     && FIRST=\$(snaps fresh) && [ -n \"\$FIRST\" ] \
     && ! snapveil run fresh 2>fresh2.log && grep -q 'force = true' fresh2.log && grep -q 'tpool2/backup/fresh/' fresh2.log \
     && [ \"\$(snaps fresh)\" = \"\$FIRST\" ]"
config fresh 'force = true'
check "with force = true the tree is received over and the increment follows" \
    "snapveil run fresh 2>fresh3.log && grep -q 'destroying what it left there' fresh3.log \
     && for c in '' logs vault zz; do [ \"\$(snaps fresh \$c | wc -l)\" = 2 ] || exit 1; done && snapveil verify fresh"

#!/usr/bin/env bash
# Raw ZFS mode (src/zfs_send) on real OpenZFS, where zfs-fuse cannot go: a natively
# encrypted dataset sent raw (zfs send -w), full then incremental, to a directory target
# with no plaintext in it; after the base snapshot is destroyed, the next increment
# starts at its bookmark; restored by snapveil and by stock `zfs receive`, identical to
# the source; its records sealed, an edited one refused (issue 14); an altered stream
# refused with no dataset left; a plain dataset without age keys is never sent.
# disks: rawzfs:1G
# seconds: 188
# needs: restore
. "$(dirname "$0")/lib.sh"
P=rawpool DS=rawpool/secret ST=$PWD/state T=$PWD/target CFG=$PWD/c.toml KEYF=$PWD/zkey
RKEY=$PWD/rec.conf RPASS=$PWD/rec.pass
cleanup() { zpool destroy -f $P 2>/dev/null; true; }
trap cleanup EXIT
modprobe zfs
# The record key (seals streams/STAMP.json; never encrypts a stream).
snapveil init --scrypt-n 12 --config $RKEY --passfile $RPASS >/dev/null

cat >"$CFG" <<EOF
state_dir = "$ST"

[[job]]
name = "raw"
mode = "zfs-raw"
source = "zfs:$DS"
target = "$T"
key_config = "$RKEY"
passfile = "$RPASS"

[[job]]
name = "plain"
mode = "zfs-raw"
source = "zfs:$P/plain"
target = "$PWD/t-plain"
key_config = "$RKEY"
passfile = "$RPASS"
EOF

# stream KIND: the one stream file of that kind (full | from-...)
streams() {
    local f
    for f in "$T"/streams/*; do
        case $f in *.json | *.sha1) ;; *) basename "$f" ;; esac
    done
}
snaps() { zfs list -H -o name -t snapshot -d 1 $DS; }

check "pool, natively encrypted dataset with a tree" \
    "zpool create -f -O mountpoint=/$P $P $(disk rawzfs) && printf 'correct horse battery' >$KEYF && zfs create -o encryption=on -o keyformat=passphrase -o keylocation=file://$KEYF $DS && random_tree /$DS 4 && echo PLAINTEXT-MARKER >/$DS/marker"

check "first run: a full raw stream, its sha1, its record; no plaintext in it" \
    "snapveil run --config $CFG raw && [ \"\$(streams)\" = \"\$(streams | grep '\.full\.raw\.zfs$')\" ] && [ \"\$(streams | wc -l)\" = 1 ] && (cd $T/streams && sha1sum -c --quiet *.sha1) && ! grep -qa PLAINTEXT-MARKER $T/streams/*.raw.zfs"
S1=$(snaps | sed -n 's/.*@snapveil-raw-//p')

echo second >/$DS/marker; rm -f /$DS/etc/motd; sync
check "second run: an increment from the first; the sent snapshot is bookmarked, the older one gone" \
    "snapveil run --config $CFG raw && streams | grep -q '\.from-snapveil-raw-$S1\.raw\.zfs$' && [ \"\$(snaps | wc -l)\" = 1 ] && S2=\$(snaps | sed -n 's/.*@//p') && zfs list -H -t bookmark $DS#\$S2"
S2=$(snaps | sed -n 's/.*@snapveil-raw-//p')

# Someone releases our hold and destroys the kept snapshot: the bookmark still carries on.
zfs release snapveil-raw "$DS@snapveil-raw-$S2"
zfs destroy "$DS@snapveil-raw-$S2"
echo third >/$DS/marker; head -c 1M /dev/urandom >/$DS/var/lib/app/more.bin; sync
WANT=$(tree_digest /$DS)
check "third run: the increment starts at the bookmark of the destroyed base" \
    "snapveil run --config $CFG raw 2>run3.log && streams | grep -q '\.from-snapveil-raw-$S2\.raw\.zfs$' && grep -q '#snapveil-raw-$S2' run3.log"
S3=$(snaps | sed -n 's/.*@snapveil-raw-//p')

check "verify: every stream file matches its sha1 and every base is there" \
    "snapveil verify --config $CFG raw"

check "snapveil restore: the chain into a new dataset, unlocked with the source's key, equals the source" \
    "snapveil restore --config $CFG raw --snapshot $S3 --into $P/back && zfs load-key -L file://$KEYF $P/back && zfs mount $P/back && [ \"\$(tree_digest /$P/back)\" = $WANT ]"

check "stock zfs receive of the same files, full first, equals the source" \
    "for f in \$(ls $T/streams/*.json | sort); do zfs receive -u $P/stock <$T/streams/\$(sed -n 's/^ *\"file\": \"\(.*\)\",\$/\1/p' \$f) || exit 1; done && zfs load-key -L file://$KEYF $P/stock && zfs mount $P/stock && [ \"\$(tree_digest /$P/stock)\" = $WANT ]"

check "every record is sealed; one edited is TAMPERED for verify and restore, nothing received" \
    "[ \"\$(grep -l '^snapveil-mac-v1 ' $T/streams/*.json | wc -l)\" = 3 ] && cp $T/streams/$S2.json rec.bak && sed -i 's/\"bytes\": /\"bytes\": 1/' $T/streams/$S2.json && ! snapveil verify --config $CFG raw >out && grep -q 'TAMPERED: streams/$S2.json' out && ! snapveil restore --config $CFG raw --snapshot $S3 --into $P/t 2>err && grep -q 'TAMPERED: streams/$S2.json' err && ! zfs list $P/t && cp rec.bak $T/streams/$S2.json && snapveil verify --config $CFG raw"

f2=$(streams | grep "from-snapveil-raw-$S1")
perl -e 'open(F,"+<",$ARGV[0]); seek(F,(-s $ARGV[0])/2,0); read(F,$c,1); seek(F,(-s $ARGV[0])/2,0); print F chr(ord($c)^1); close F' "$T/streams/$f2"
check "an altered stream: restore refused before any receive, no dataset left; verify fails" \
    "! snapveil restore --config $CFG raw --snapshot $S3 --into $P/t 2>err && grep -q 'altered or cut' err && ! zfs list $P/t && ! snapveil verify --config $CFG raw"

check "a plain dataset without age keys is never sent, and no snapshot stays" \
    "zfs create $P/plain && echo x >/$P/plain/f && ! snapveil run --config $CFG plain 2>err && grep -q 'never sends an unencrypted stream' err && [ -z \"\$(zfs list -H -t snapshot -r $P/plain)\" ] && ! compgen -G '$PWD/t-plain/streams/*.zfs*' "

#!/usr/bin/env bash
# Raw ZFS chains on real OpenZFS (issue 15), where zfs-fuse has no bookmarks, no
# `zfs holds -H`, no native encryption and no zstream: full_every starts a new chain and
# the prune of every run deletes the old chain whole, never a stream a kept point needs;
# source snapshots by the policy, the newest held (`zfs hold snapveil-JOB`), the hold of
# the one it supersedes released, the next increment still possible after a user destroys
# what is not held; `verify --deep` (zstream dump, zfs receive -n) catching an altered, a
# truncated and a reordered stream whose .sha1 was forged along with it, with no dataset
# left (the record's sha1 is sealed, so plain verify names them too); a recursive tree with a child that is its own encryption root, its key unloaded,
# sent raw and restored bit for bit; a mixed plain/encrypted tree without age keys refused.
# disks: chainzfs:1G
# seconds: 298
. "$(dirname "$0")/lib.sh"
P=chainpool DS=chainpool/db ST=$PWD/state T=$PWD/target CFG=$PWD/c.toml
KEYF=$PWD/dbkey TK=$PWD/treekey KK=$PWD/kidkey INFO=$PWD/info
RKEY=$PWD/rec.conf RPASS=$PWD/rec.pass
cleanup() {
    [[ -f $INFO ]] && sed 's/^/    info: /' "$INFO"
    zpool destroy -f $P 2>/dev/null
    true
}
trap cleanup EXIT
modprobe zfs
# The record key (seals streams/STAMP.json; never encrypts a stream).
snapveil init --scrypt-n 12 --config $RKEY --passfile $RPASS >/dev/null

# config FULL_EVERY_LINE: the three jobs; ch prunes after every run, keeping 2.
config() {
    cat >"$CFG" <<EOF
state_dir = "$ST"

[[job]]
name = "tree"
mode = "zfs-raw"
key_config = "$RKEY"
passfile = "$RPASS"
source = "zfs:$P/tree"
target = "$PWD/t-tree"
[job.snapshot]
recursive = true

[[job]]
name = "mix"
mode = "zfs-raw"
key_config = "$RKEY"
passfile = "$RPASS"
source = "zfs:$P/mix"
target = "$PWD/t-mix"
[job.snapshot]
recursive = true

[[job]]
name = "ch"
mode = "zfs-raw"
key_config = "$RKEY"
passfile = "$RPASS"
source = "zfs:$DS"
target = "$T"
$1
[job.retention]
last = 2
EOF
}
snaps() { zfs list -H -o name -t snapshot -d 1 $DS | sed -n 's/.*@snapveil-ch-//p'; }
stamps() { ls "$T"/streams/ | sed -n 's/^\([0-9TZ]*\)\.json$/\1/p'; }
file_of() { sed -n 's/^ *"file": "\(.*\)",$/\1/p' "$T/streams/$1.json"; }
held() { zfs holds -H "$DS@snapveil-ch-$1" | grep -qP '\tsnapveil-ch\t'; }
# forge STAMP: rewrite the stream's .sha1 to match the file as it is now (the record's
# sha1 is sealed: forging it there is tests/tamper_raw.rs's case, caught by the seal).
forge() {
    local f sum
    f=$(file_of "$1")
    sum=$(sha1sum "$T/streams/$f" | cut -d' ' -f1)
    echo "$sum  $f" >"$T/streams/$f.sha1"
}
save() { mkdir -p "$PWD/orig" && cp -a "$T/streams/." "$PWD/orig/"; }
restore_orig() { cp -a "$PWD/orig/." "$T/streams/"; }
# reorder FILE: swap two 64 KiB blocks.
reorder() {
    local a b
    a=$(mktemp) b=$(mktemp)
    dd if="$1" of="$a" bs=64k skip=4 count=1 status=none
    dd if="$1" of="$b" bs=64k skip=12 count=1 status=none
    dd if="$b" of="$1" bs=64k seek=4 count=1 conv=notrunc status=none
    dd if="$a" of="$1" bs=64k seek=12 count=1 conv=notrunc status=none
}
# attacked WHAT: `sha1sum -c` is fooled by the forged .sha1; plain verify names the file
# (the sealed record's sha1), and --deep also says what zstream dump / zfs receive -n
# found, with no dataset left by `zfs receive -n`. What each tool says goes to the log.
attacked() {
    local f out
    f=$(file_of "$F3")
    forge "$F3"
    (cd "$T/streams" && sha1sum -c --quiet "$f.sha1") || { echo "sha1sum -c should pass with a forged .sha1"; return 1; }
    out=$(snapveil verify --config "$CFG" ch 2>&1) && { echo "$out"; return 1; }
    echo "$out" | grep -F "BAD streams/$f: sha1 " || { echo "$out"; return 1; }
    out=$(snapveil verify --config "$CFG" ch --deep 2>&1) && { echo "$out"; return 1; }
    echo "$out" | grep -F -e "BAD streams/$f: zstream dump" -e "BAD streams/$f: zfs receive -n" || { echo "$out"; return 1; }
    {
        echo "$1: snapveil: $(echo "$out" | grep "^BAD")"
        echo "$1: zstream dump alone: exit $(zstream dump <"$T/streams/$f" >zs.out 2>&1; echo $?), $(grep -i -m1 -e checksum -e invalid zs.out) $(grep 'DRR_END' zs.out | tr -s ' \t' ' ')"
        echo "$1: zfs receive -n alone: exit $(zfs receive -n -u $P/probe <"$T/streams/$f" >rn.out 2>&1; echo $?) $(tail -1 rn.out)"
    } >>"$INFO"
    ! zfs list $P/snapveil-verify-ch 2>/dev/null && ! zfs list $P/probe 2>/dev/null
}

config ""
check "pool, an encrypted dataset, an encrypted tree with a child that is its own encryption root, a plain tree with an encrypted child" \
    "zpool create -f -O mountpoint=/$P $P $(disk chainzfs) && for k in $KEYF $TK $KK; do head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >\$k; done && zfs create -o encryption=on -o keyformat=hex -o keylocation=file://$KEYF $DS && random_tree /$DS 2 && zfs create -o encryption=on -o keyformat=hex -o keylocation=file://$TK $P/tree && zfs create -o encryption=on -o keyformat=hex -o keylocation=file://$KK $P/tree/kid && zfs create $P/tree/inherit && random_tree /$P/tree 1 && random_tree /$P/tree/kid 1 && echo x >/$P/tree/inherit/f && zfs create $P/mix && zfs create -o encryption=on -o keyformat=hex -o keylocation=file://$TK $P/mix/enc"

check "two runs: a full stream and an increment; the newest held, the older released and kept by last = 2" \
    "snapveil run --config $CFG ch && echo b >/$DS/b && snapveil run --config $CFG ch && [ \"\$(stamps | wc -l)\" = 2 ] && [ \"\$(snaps | wc -l)\" = 2 ] && held \$(snaps | tail -1) && ! held \$(snaps | head -1)"
S2=$(snaps | tail -1)

sleep 1
config 'full_every = "1s"'
check "full_every: the chain's full is older: a new full stream; prune keeps the old chain (the kept increment needs it)" \
    "echo c >/$DS/c && snapveil run --config $CFG ch && ls $T/streams | grep -c '\.full\.raw\.zfs\$' | grep -qx 2 && [ \"\$(stamps | wc -l)\" = 3 ]"
F3=$(snaps | tail -1)

config 'full_every = "30d"'
check "the next run: an increment from the new full; the old chain goes whole (records and streams), in the ledger; the source keeps 2, holds the newest, keeps one bookmark" \
    "echo d >/$DS/d && snapveil run --config $CFG ch && [ \"\$(stamps | tr '\n' ' ')\" = \"$F3 \$(snaps | tail -1) \" ] && [ \"\$(ls $T/streams | grep -c '\.zfs\$')\" = 2 ] && grep -q '\"stamp\": \"$S2\"' $T/streams/pruned.json && [ \"\$(snaps | head -1)\" = $F3 ] && held \$(snaps | tail -1) && ! held $F3 && [ \"\$(zfs list -H -t bookmark -d 1 $DS | wc -l)\" = 1 ]"
S4=$(snaps | tail -1)

check "the held base resists another tool's destroy; what is not held goes; the next increment starts at the base" \
    "! zfs destroy $DS@snapveil-ch-$S4 && zfs destroy $DS@snapveil-ch-$F3 && echo e >/$DS/e && snapveil run --config $CFG ch && ls $T/streams | grep -q 'from-snapveil-ch-$S4\.raw\.zfs\$' && held \$(snaps | tail -1) && ! held $S4"
WANT=$(tree_digest /$DS)
S5=$(snaps | tail -1)

check "prune --dry-run names what it keeps and why; the pruned target restores the newest point, equal to the source" \
    "snapveil prune --config $CFG ch --dry-run | grep -q '$F3  keep    needed by $S4' && snapveil restore --config $CFG ch --snapshot $S5 --into $P/back && zfs load-key -L file://$KEYF $P/back && zfs mount $P/back && [ \"\$(tree_digest /$P/back)\" = $WANT ]"

check "verify --deep: zstream dump checks every stream's checksums, zfs receive -n parses the full one, nothing is left" \
    "out=\$(snapveil verify --config $CFG ch --deep) && echo \"\$out\" && [ \"\$(echo \"\$out\" | grep -c 'zstream dump: record checksums and END checksum ok')\" = 3 ] && echo \"\$out\" | grep -q 'zfs receive -n -v -u $P/snapveil-verify-ch: ok' && ! zfs list $P/snapveil-verify-ch"

save
check "an altered byte in the full stream, .sha1 forged: verify names it by the sealed sha1, --deep by the stream itself" \
    "f=\$(file_of $F3); perl -e 'open(F,\"+<\",\$ARGV[0]); seek(F,(-s \$ARGV[0])/2,0); read(F,\$c,1); seek(F,(-s \$ARGV[0])/2,0); print F chr(ord(\$c)^1); close F' $T/streams/\$f && attacked altered"
restore_orig
check "a truncated full stream, .sha1 forged: verify names it by the sealed sha1, --deep by the stream itself" \
    "f=\$(file_of $F3); truncate -s \$((\$(stat -c %s $T/streams/\$f) / 2)) $T/streams/\$f && attacked truncated"
restore_orig
check "a reordered full stream (two 64 KiB blocks swapped), .sha1 forged: verify names it by the sealed sha1, --deep by the stream itself" \
    "f=\$(file_of $F3); reorder $T/streams/\$f && attacked reordered"
restore_orig

check "a recursive tree, a child its own encryption root: sent raw (-w -R), full then increment with the child's key unloaded, reported" \
    "snapveil run --config $CFG tree 2>log1 && grep -q 'its own encryption root' log1 && echo y >/$P/tree/inherit/g && echo z >/$P/tree/kid/z && tree_digest /$P/tree >$PWD/want-tree && zfs unmount $P/tree/kid && zfs unload-key $P/tree/kid && snapveil run --config $CFG tree 2>log2 && grep -q 'key not loaded' log2 && ls $PWD/t-tree/streams | grep -q '\.from-.*\.raw\.zfs\$'"

check "the tree restored by snapveil, each encryption root unlocked with its own key, equals the source bit for bit" \
    "s=\$(ls $PWD/t-tree/streams | sed -n 's/^\([0-9TZ]*\)\.json\$/\1/p' | tail -1) && snapveil restore --config $CFG tree --snapshot \$s --into $P/tback && zfs load-key -L file://$TK $P/tback && zfs load-key -L file://$KK $P/tback/kid && [ \"\$(zfs get -H -o value encryptionroot $P/tback/kid)\" = $P/tback/kid ] && zfs mount $P/tback && zfs mount $P/tback/kid && zfs mount $P/tback/inherit && [ \"\$(tree_digest /$P/tback)\" = \"\$(cat $PWD/want-tree)\" ]"

check "a plain tree with an encrypted child and no age keys: refused, naming the plain dataset; no snapshot left" \
    "! snapveil run --config $CFG mix 2>err && grep -q 'plain ones' err && grep -q '($P/mix)' err && [ -z \"\$(zfs list -H -t snapshot -r $P/mix)\" ]"

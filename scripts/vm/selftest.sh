#!/usr/bin/env bash
# selftest.sh: host-side checks of the tier's own scripts, no guest needed (~10 s):
# runs shellcheck on scripts/vm and tests/vm, tests the host-mirror parser against sample
# apt configurations, and the relaunch of a hung boot. Prints PASS/FAIL lines and
# `N passed, N failed`; test-vm.sh runs it first and adds its tally to the tier's.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PASS=0 FAIL=0
ok() { echo "PASS: $1"; PASS=$((PASS + 1)); }
ko() { echo "FAIL: $1"; shift; printf '    %s\n' "$@"; FAIL=$((FAIL + 1)); }

if command -v shellcheck >/dev/null; then
    if out=$(shellcheck -S warning -x -P "$HERE:$REPO/tests/vm" "$HERE"/*.sh "$REPO"/tests/vm/*.sh 2>&1); then
        ok "shellcheck scripts/vm tests/vm"
    else
        ko "shellcheck scripts/vm tests/vm" "$out"
    fi
else
    ko "shellcheck is missing: run scripts/install-deps.sh"
fi

# mirror EXPECTED_MAIN EXPECTED_SECURITY DESCRIPTION: parse the files staged in $etc
etc=$(mktemp -d)
trap 'rm -rf "$etc"' EXIT
mirror() {
    local got
    got=$(VM_APT_ETC=$etc bash -c '. "$1"; vm_host_mirror; echo "$VM_MIRROR|$VM_SECURITY_MIRROR"' _ "$HERE/vmlib.sh" 2>&1)
    if [[ $got == "$1|$2" ]]; then ok "mirror: $3"; else ko "mirror: $3" "want $1|$2" "got  $got"; fi
    rm -rf "${etc:?}"/*
    mkdir -p "$etc/sources.list.d"
}
mkdir -p "$etc/sources.list.d"

cat >"$etc/sources.list.d/debian.sources" <<'S'
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.example.org/debian/
Suites: bookworm bookworm-updates
Components: main

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm

Types: deb
URIs: http://sec.example.org/debian-security
Suites: bookworm-security
Components: main
S
echo 'deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main' >"$etc/sources.list.d/google.list"
mirror http://deb.example.org/debian http://sec.example.org/debian-security "deb822 with comments, deb-src and a third-party list"

cat >"$etc/sources.list.d/a.sources" <<'S'
Types: deb
URIs: http://off.example.org/debian
Suites: bookworm
Enabled: no

Types: deb
URIs: http://on.example.org/debian
Suites: bookworm
S
mirror http://on.example.org/debian "" "a disabled stanza is ignored"

cat >"$etc/sources.list" <<'S'
# deb http://commented.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://one.example.org/debian bookworm main contrib
deb http://security.example.org/debian-security bookworm-security main
S
mirror http://one.example.org/debian http://security.example.org/debian-security "one-line format with [options]"

echo 'deb http://trixie.example.org/debian trixie main' >"$etc/sources.list"
mirror http://trixie.example.org/debian "" "another Debian suite's archive serves bookworm"

echo 'deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main' >"$etc/sources.list"
got=$(VM_APT_ETC=$etc bash -c '. "$1"; vm_host_mirror' _ "$HERE/vmlib.sh" 2>&1) && rc=0 || rc=$?
if ((rc != 0)) && [[ $got == *"no Debian archive"* ]]; then ok "mirror: no Debian archive is a clear error"; else ko "mirror: no Debian archive is a clear error" "exit $rc: $got"; fi

# vm_wait's relaunch of a hung boot, with a stand-in qemu (it only sleeps) and vm_ssh
# answering once the Nth qemu runs. BOOT_TRIES ANSWER_AT: prints "rc launches alive".
boot() {
    local fake
    fake=$(mktemp -d)
    mkdir "$fake/bin" "$fake/guest"
    touch "$fake/guest"/{vmlinuz,initrd.img,root.img,id_ed25519}
    printf '#!/bin/sh\necho $$ >>"%s/pids"\nexec sleep 300\n' "$fake" >"$fake/bin/qemu-system-x86_64"
    chmod +x "$fake/bin/qemu-system-x86_64"
    PATH=$fake/bin:$PATH SNAPVEIL_VM_CACHE=$fake/cache SNAPVEIL_VM_ACCEL=tcg SNAPVEIL_VM_BOOT_TIMEOUT=2 \
        SNAPVEIL_VM_BOOT_TRIES=$1 bash -c '
        . "$1"
        FAKE=$2 ANSWER_AT=$3
        vm_ssh() { (($(wc -l <"$FAKE/pids") >= ANSWER_AT)); }
        vm_start "$2/guest" scratch:1M 2>/dev/null
        vm_wait 2>/dev/null && rc=0 || rc=$?
        vm_cleanup 2>/dev/null
        alive=0
        while read -r p; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done <"$2/pids"
        echo "$rc $(wc -l <"$2/pids") $alive"' _ "$HERE/vmlib.sh" "$fake" "$2"
    rm -rf "$fake"
}
got=$(boot 2 2)
if [[ $got == "0 2 0" ]]; then ok "boot: a guest that hangs is killed and booted again"; else ko "boot: a guest that hangs is killed and booted again" "want rc 0, 2 launches, none alive" "got  $got"; fi
got=$(boot 2 3)
if [[ $got == "1 2 0" ]]; then ok "boot: a guest that hangs every time fails after the last try, no qemu left"; else ko "boot: a guest that hangs every time fails after the last try, no qemu left" "want rc 1, 2 launches, none alive" "got  $got"; fi

echo "$PASS passed, $FAIL failed"
((FAIL == 0))

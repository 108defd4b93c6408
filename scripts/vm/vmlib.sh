# shellcheck shell=bash
# vmlib.sh: the real-kernel test tier's shared shell code (sourced, never run).
#
# It owns three things, so that build-guest.sh and test-vm.sh agree on them:
#   * where the guest lives: a cache dir keyed by what went into it (vm_cache_key);
#   * which Debian mirror is used: read from the host's apt configuration at run time,
#     never written into the repository (vm_host_mirror);
#   * one qemu guest per shell: vm_start / vm_wait / vm_ssh / vm_stop, with a guard that
#     takes qemu down on every way out (EXIT/INT/TERM trap, and `setpriv --pdeathsig`
#     for a SIGKILL of the shell, which runs no trap).
#
# Why the cache is NOT under target/: the guest does not depend on the Rust code, costs
# ~5.5 minutes and a network fetch to rebuild, and is 1.2 GiB; `cargo clean` wiping it
# would be unwanted, and every git worktree would build its own copy. So it lives in
# $SNAPVEIL_VM_CACHE (default /var/tmp/snapveil-vm: /var/tmp survives reboots, unlike
# /tmp), one directory per key. `scripts/vm/build-guest.sh --gc` drops unused ones.
#
# Settings (environment):
#   SNAPVEIL_VM_CACHE   cache root                       (/var/tmp/snapveil-vm)
#   SNAPVEIL_VM_ACCEL   auto | kvm | tcg                 (auto: kvm only when /dev/kvm is
#                       backed by kvm_intel/kvm_amd; a kvm_pvm-backed /dev/kvm, as on this
#                       project's CI machines, runs only PVM guest kernels: Debian's hangs)
#   SNAPVEIL_VM_MEM / SNAPVEIL_VM_CPUS   guest RAM in MiB / vCPUs (3072 / 2)
#   SNAPVEIL_VM_BOOT_TIMEOUT             seconds a boot gets until sshd answers (kvm 120, tcg 300)
#   SNAPVEIL_VM_BOOT_TRIES               boots before giving up: a hung one is killed (2)
#   SNAPVEIL_VM_KEEP=1                   keep the run dir (console log, scratch disks)
#   SNAPVEIL_VM_ZFS_SUITE                bookworm (OpenZFS 2.1) | bookworm-backports

VM_SUITE=bookworm
VM_CACHE=${SNAPVEIL_VM_CACHE:-/var/tmp/snapveil-vm}
VM_ZFS_SUITE=${SNAPVEIL_VM_ZFS_SUITE:-bookworm}
VM_MEM=${SNAPVEIL_VM_MEM:-3072}
VM_CPUS=${SNAPVEIL_VM_CPUS:-2}
VM_ACCEL=${SNAPVEIL_VM_ACCEL:-auto}

# Packages of the guest. Kernel, headers and the compiler go in first: zfs-dkms's postinst
# builds zfs.ko for every kernel whose headers it finds (the host's running kernel is
# irrelevant), so they must be configured before zfs-dkms is unpacked.
VM_BASE_PKGS=(linux-image-amd64 linux-headers-amd64 dkms gcc make libc6-dev
    lvm2 xfsprogs e2fsprogs btrfs-progs rsync openssh-server openssh-client fuse3 gocryptfs
    kmod iproute2 procps psmisc util-linux ca-certificates less)
VM_ZFS_PKGS=(zfs-dkms zfsutils-linux)

vm_log() { printf '[vm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vm_die() { vm_log "error: $*"; exit 1; }
vm_elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# ------------------------------------------------------------------ mirror
# Print "URI SUITE" for every enabled `deb` entry of the host's apt configuration,
# deb822 (*.sources) and one-line (sources.list, *.list) formats alike.
_vm_apt_entries() {
    local f
    local etc=${VM_APT_ETC:-/etc/apt}
    for f in "$etc"/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        awk '
            function flush(   n, m, i, j, u, s) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled) {
                    n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (u[i] != "" && s[j] != "") print u[i], s[j]
                }
                types = ""; uris = ""; suites = ""; enabled = 1
            }
            BEGIN { enabled = 1 }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            { key = tolower($1); $1 = ""; val = $0; sub(/^[ \t]+/, "", val) }
            key == "types:"   { types = val }
            key == "uris:"    { uris = val }
            key == "suites:"  { suites = val }
            key == "enabled:" { enabled = (tolower(val) != "no") }
            END { flush() }' "$f"
    done
    for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i + 1) }' "$f"
    done
}

# Sets VM_MIRROR and VM_SECURITY_MIRROR (may be empty) from the host's apt configuration.
# Prefers the entries for bookworm itself; any other Debian suite's archive serves too.
vm_host_mirror() {
    local entries
    entries=$(_vm_apt_entries | awk '$1 ~ /^https?:\/\//')
    VM_MIRROR=$(awk -v s="$VM_SUITE" '$2 == s { print $1; exit }' <<<"$entries")
    [[ -n $VM_MIRROR ]] || VM_MIRROR=$(awk '$1 ~ /debian\/?$/ && $2 !~ /-security$/ { print $1; exit }' <<<"$entries")
    VM_SECURITY_MIRROR=$(awk -v s="$VM_SUITE-security" '$2 == s { print $1; exit }' <<<"$entries")
    [[ -n $VM_MIRROR ]] || vm_die "no Debian archive in the host's /etc/apt/sources.list{,.d/*}: cannot build the guest"
    VM_MIRROR=${VM_MIRROR%/}
    VM_SECURITY_MIRROR=${VM_SECURITY_MIRROR%/}
}

# The guest's sources.list (also used, on the host, to resolve package versions).
vm_sources_list() {
    local signed="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    echo "deb $signed $VM_MIRROR $VM_SUITE main contrib"
    echo "deb $signed $VM_MIRROR $VM_SUITE-updates main contrib"
    if [[ -n $VM_SECURITY_MIRROR ]]; then
        echo "deb $signed $VM_SECURITY_MIRROR $VM_SUITE-security main contrib"
    fi
    if [[ $VM_ZFS_SUITE == *-backports ]]; then
        echo "deb $signed $VM_MIRROR $VM_ZFS_SUITE main contrib"
    fi
}

# ------------------------------------------------------------------ cache key
# apt on the host, but with its own state under the cache: it only reads the indexes of
# the guest's sources and installs nothing on the host.
_vm_apt() {
    local cmd=$1; shift
    "$cmd" -o Dir::State="$VM_CACHE/apt/state" -o Dir::Cache="$VM_CACHE/apt/cache" \
        -o Dir::Etc::SourceList="$VM_CACHE/apt/sources.list" -o Dir::Etc::SourceParts="$VM_CACHE/apt/empty.d" \
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$VM_CACHE/apt/empty.d" \
        -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Architecture=amd64 "$@"
}

# Print "package version" for the guest's top-level packages, as the mirror offers them now.
# Refreshes the indexes (cheap when unchanged: apt fetches only InRelease); when the
# mirror is unreachable the indexes of the last refresh decide, so a cached guest still boots.
vm_resolve_versions() {
    mkdir -p "$VM_CACHE/apt/state/lists/partial" "$VM_CACHE/apt/cache/archives/partial" "$VM_CACHE/apt/empty.d"
    vm_sources_list > "$VM_CACHE/apt/sources.list"
    if ! _vm_apt apt-get -qq update >"$VM_CACHE/apt/update.log" 2>&1; then
        vm_log "warning: apt-get update against $VM_MIRROR failed (see $VM_CACHE/apt/update.log); using the last indexes"
    fi
    local zfs_release=()
    [[ $VM_ZFS_SUITE == *-backports ]] && zfs_release=(-o "APT::Default-Release=$VM_ZFS_SUITE")
    {
        _vm_apt apt-cache policy "${VM_BASE_PKGS[@]}"
        _vm_apt apt-cache "${zfs_release[@]}" policy "${VM_ZFS_PKGS[@]}"
    } | awk '/^[^ ].*:$/ { p = substr($0, 1, length($0) - 1) }
             $1 == "Candidate:" { print p, $2; if ($2 == "(none)") bad = 1 }
             END { exit bad }' \
        || vm_die "some guest package has no candidate in $VM_MIRROR (contrib missing?): see above"
}

# Sets VM_KEY (16 hex digits) and VM_VERSIONS: the key changes when the recipe or any
# top-level package version changes, and only then. The recipe is the code that makes
# the image (build-guest.sh's build_in_namespace, as bash prints it: comments and the
# rest of the scripts do not count), the package lists and the sources.
vm_cache_key() {
    declare -F build_in_namespace >/dev/null || vm_die "vm_cache_key: only build-guest.sh computes the key"
    vm_host_mirror
    VM_VERSIONS=$(vm_resolve_versions) || exit 1
    [[ -n $VM_VERSIONS ]] || vm_die "could not resolve the guest's package versions"
    # shellcheck disable=SC2034 # used by build-guest.sh
    VM_KEY=$({
        echo "suite $VM_SUITE zfs $VM_ZFS_SUITE"
        declare -f build_in_namespace vm_sources_list
        printf '%s\n' "${VM_BASE_PKGS[@]}" "${VM_ZFS_PKGS[@]}"
        echo "$VM_VERSIONS"
    } | sha256sum | cut -c1-16)
}

# ------------------------------------------------------------------ one guest
VM_PID=
VM_PORT=
VM_RUN=

vm_pick_accel() {
    if [[ $VM_ACCEL == auto ]]; then
        VM_ACCEL=tcg
        if [[ -w /dev/kvm && ! -d /sys/module/kvm_pvm ]] && [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then
            VM_ACCEL=kvm
        fi
    fi
}

# Remove run dirs whose owner died without its trap (kill -9): their qemu died with it
# (pdeathsig), but the scratch disks would stay.
_vm_reap_stale_runs() {
    local d pid
    for d in "$VM_CACHE"/runs/run.*; do
        [[ -d $d ]] || continue
        pid=$(cat "$d/owner.pid" 2>/dev/null || echo)
        if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
            vm_log "removing stale run dir $d"
            rm -rf "$d"
        fi
    done
}

# Stop this shell's qemu: TERM, then KILL after 5 s.
_vm_kill() {
    if [[ -n $VM_PID ]] && kill -0 "$VM_PID" 2>/dev/null; then
        vm_log "stopping qemu pid $VM_PID"
        kill "$VM_PID" 2>/dev/null || true
        for _ in $(seq 1 10); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$VM_PID" 2>/dev/null || true
    fi
    [[ -n $VM_PID ]] && { wait "$VM_PID" 2>/dev/null || true; }
    VM_PID=
    return 0
}

# The guard. Every command may fail (qemu already gone) and callers run under `set -e`,
# which would otherwise abort the trap half-way: hence `|| true` everywhere.
vm_cleanup() {
    _vm_kill
    if [[ -n $VM_RUN && -d $VM_RUN ]]; then
        if [[ ${SNAPVEIL_VM_KEEP:-0} == 1 ]]; then vm_log "kept $VM_RUN"; else rm -rf "$VM_RUN" || true; fi
    fi
    VM_RUN=
    return 0
}

_vm_free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

# vm_rundir: creates this shell's run dir (scratch disks, logs, $VM_RUN/share) and
# installs the guard. vm_start calls it unless the caller did, to stage files first.
vm_rundir() {
    [[ -z $VM_RUN ]] || return 0
    mkdir -p "$VM_CACHE/runs"
    _vm_reap_stale_runs
    VM_RUN=$(mktemp -d "$VM_CACHE/runs/run.XXXXXX")
    echo $$ >"$VM_RUN/owner.pid"
    mkdir "$VM_RUN/share"
    trap vm_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# vm_start GUEST_DIR DISK...   (DISK = name:size, a sparse file each, seen in the guest
# as /dev/disk/by-id/virtio-NAME whatever the probe order). $VM_RUN/share is exported
# read-only over 9p with tag "hostshare" (the guest mounts it at /mnt/host).
vm_start() {
    local guest=$1; shift
    local f d name
    for f in vmlinuz initrd.img root.img id_ed25519; do
        [[ -e $guest/$f ]] || vm_die "missing $guest/$f: run scripts/vm/build-guest.sh"
    done
    vm_rundir
    VM_GUEST=$guest
    _VM_DISKS=("$@")
    _VM_DISK_ARGS=()
    for d in "$@"; do
        name=${d%%:*}
        _VM_DISK_ARGS+=(-drive "file=$VM_RUN/$name.img,if=none,id=$name,format=raw,cache=unsafe,discard=unmap"
            -device "virtio-blk-pci,drive=$name,serial=$name")
    done
    vm_pick_accel
    if [[ $VM_ACCEL == kvm ]]; then
        _VM_ACCEL_ARGS=(-accel kvm -cpu host)
        VM_BOOT_TIMEOUT=${SNAPVEIL_VM_BOOT_TIMEOUT:-120}
    else
        _VM_ACCEL_ARGS=(-accel "tcg,thread=multi" -cpu max)
        VM_BOOT_TIMEOUT=${SNAPVEIL_VM_BOOT_TIMEOUT:-300}
    fi
    _vm_launch
}

# One qemu process on fresh scratch disks (a relaunch after a hung boot gets new ones:
# nothing of the hung guest carries over).
_vm_launch() {
    local try d
    for d in "${_VM_DISKS[@]}"; do
        rm -f "$VM_RUN/${d%%:*}.img"
        truncate -s "${d#*:}" "$VM_RUN/${d%%:*}.img"
    done
    for try in 1 2 3; do
        VM_PORT=$(_vm_free_port) || vm_die "no free 127.0.0.1 port"
        # --pdeathsig: qemu gets SIGTERM when this shell dies, even by SIGKILL.
        # The root image is opened with snapshot=on: every boot starts from the pristine
        # image, writes go to an overlay qemu unlinks at once.
        setpriv --pdeathsig TERM -- qemu-system-x86_64 "${_VM_ACCEL_ARGS[@]}" -smp "$VM_CPUS" -m "$VM_MEM" \
            -nodefaults -display none -no-reboot \
            -kernel "$VM_GUEST/vmlinuz" -initrd "$VM_GUEST/initrd.img" \
            -append "root=LABEL=snapveilroot rw console=ttyS0 quiet panic=-1" \
            -drive "file=$VM_GUEST/root.img,if=none,id=root,format=raw,snapshot=on" \
            -device virtio-blk-pci,drive=root \
            "${_VM_DISK_ARGS[@]}" \
            -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$VM_PORT-:22" \
            -device virtio-net-pci,netdev=n0 \
            -virtfs "local,path=$VM_RUN/share,mount_tag=hostshare,security_model=none,readonly=on,id=hostshare" \
            -device virtio-rng-pci \
            -serial "file:$VM_RUN/console.log" \
            >"$VM_RUN/qemu.log" 2>&1 &
        VM_PID=$!
        sleep 0.5
        kill -0 "$VM_PID" 2>/dev/null && break
        vm_log "qemu exited at once (try $try): $(cat "$VM_RUN/qemu.log")"
        wait "$VM_PID" 2>/dev/null || true
        VM_PID=
    done
    [[ -n $VM_PID ]] || vm_die "qemu does not start"
    VM_T0=$(date +%s.%N)
    vm_log "qemu pid $VM_PID ($VM_ACCEL), ssh 127.0.0.1:$VM_PORT, run dir $VM_RUN"
}

_vm_ssh_opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
    -o BatchMode=yes -o ConnectTimeout=5 -o ServerAliveInterval=10 -o ServerAliveCountMax=6)

# vm_ssh COMMAND... : runs in the guest as root; stdin, stdout and the exit status pass
# through. ssh runs in the background and is waited for, because bash defers traps
# while a foreground child runs: a TERM must reach the guard at once.
vm_ssh() {
    local pid rc=0
    ssh -i "$VM_GUEST/id_ed25519" "${_vm_ssh_opts[@]}" -p "$VM_PORT" root@127.0.0.1 "$@" <&0 &
    pid=$!
    wait "$pid" || rc=$?
    return "$rc"
}

# vm_wait: until sshd answers. A TCG guest boots in 50-90 s here (180 s once at a load
# of 9), but now and then one hangs for good early in boot: its timer stops firing
# ("rcu_preempt kthread timer wakeup didn't happen", seen in CI with two guests booting
# at once). Waiting longer does not help; a fresh qemu does. So a guest that does not
# answer within VM_BOOT_TIMEOUT is killed and booted again, SNAPVEIL_VM_BOOT_TRIES times
# in all (2). A qemu that dies is not retried: that is a configuration error.
vm_wait() {
    local attempt deadline tries=${SNAPVEIL_VM_BOOT_TRIES:-2}
    for ((attempt = 1; attempt <= tries; attempt++)); do
        deadline=$(($(date +%s) + VM_BOOT_TIMEOUT))
        while (($(date +%s) < deadline)); do
            if ! kill -0 "$VM_PID" 2>/dev/null; then
                vm_log "qemu died while booting"
                tail -n 30 "$VM_RUN/qemu.log" "$VM_RUN/console.log" >&2 || true
                return 1
            fi
            if vm_ssh true </dev/null 2>/dev/null; then
                VM_BOOT_S=$(vm_elapsed "$VM_T0")
                vm_log "guest answers on ssh after ${VM_BOOT_S}s (boot $attempt of $tries)"
                return 0
            fi
            sleep 1
        done
        vm_log "guest did not answer within ${VM_BOOT_TIMEOUT}s (boot $attempt of $tries); console tail:"
        tail -n 30 "$VM_RUN/console.log" >&2 || true
        ((attempt < tries)) || break
        _vm_kill
        mv -f "$VM_RUN/console.log" "$VM_RUN/console.$attempt.log" 2>/dev/null || true
        vm_log "killed the hung guest; booting a fresh one"
        _vm_launch
    done
    return 1
}

# Clean poweroff; the guard kills qemu if it does not stop within 30 s.
vm_stop() {
    [[ -n $VM_PID ]] || return 0
    local t0
    t0=$(date +%s.%N)
    vm_ssh 'sync; (sleep 0.2; systemctl poweroff) >/dev/null 2>&1 &' </dev/null 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$VM_PID" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$VM_PID" 2>/dev/null; then
        vm_log "guest did not power off within 30s"
    else
        vm_log "guest powered off in $(vm_elapsed "$t0")s"
    fi
    vm_cleanup
}

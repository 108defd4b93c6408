# The two commands of the README:
#   make demo   a real backup end to end on a built-in demo (installs what it needs)
#   make test   the whole test suite (installs what it needs); .ci/run calls exactly this
#               It ends with the real-kernel tier (make test-vm): OpenZFS and LVM in a
#               qemu guest, see docs/vm-tier.md.
CARGO ?= cargo

.PHONY: deps build demo test test-unit test-integration test-vm bench bench-raw bench-zfs-target deb clean

deps:
	./scripts/install-deps.sh

build:
	$(CARGO) build --release

demo: deps build
	./scripts/demo.sh

test: deps
	$(CARGO) build --all-targets
	./scripts/with-fuse-ring.sh $(CARGO) test -- --test-threads=2
	./scripts/vm/test-vm.sh

# The real-kernel tier alone: builds the guest on first use (cached in
# /var/tmp/snapveil-vm, keyed by package versions), boots it once, runs tests/vm/ in it.
test-vm: deps
	$(CARGO) build --bin snapveil
	./scripts/vm/test-vm.sh

# The pipeline benchmark (issue 13): also needs restic, which only the benchmark uses.
bench: build
	./scripts/install-deps.sh restic
	./scripts/bench.sh

# Raw ZFS mode against zfs send | zfs receive, stock age and gpg (issue 15), on zfs-fuse.
bench-raw: build
	./scripts/install-deps.sh gnupg
	$(CARGO) bench --bench age --no-run
	./scripts/bench-raw.sh

# Raw ZFS mode to a zfs:// target against `zfs send -w | ssh … zfs receive` (issue 15), on
# OpenZFS in the guest of the real-kernel tier (ratios only: the guest is emulated).
bench-zfs-target: deps build
	./scripts/vm/bench-zfs-target.sh

# A Debian package (dpkg-deb) in target/debian/.
deb: build
	./scripts/build-deb.sh

clean:
	$(CARGO) clean

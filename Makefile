# The two commands of the README:
#   make demo   a real backup end to end on a built-in demo (installs what it needs)
#   make test   the whole test suite (installs what it needs); .ci/run calls exactly this
CARGO ?= cargo

.PHONY: deps build demo test test-unit test-integration bench clean

deps:
	./scripts/install-deps.sh

build:
	$(CARGO) build --release

demo: deps build
	./scripts/demo.sh

test: deps
	$(CARGO) build --all-targets
	$(CARGO) test -- --test-threads=2

bench: deps build
	./scripts/bench.sh

clean:
	$(CARGO) clean

# kickvm: `make demo` boots the test guest with a disk and shows it working;
# `make test` runs the tests. See README.md.
CARGO ?= cargo
GUEST := target/guest/kickvm-guest

.PHONY: all build guest demo test test-linux bench bench-boot bench-blk bench-blk-pressure bench-net bench-vhost-user bench-snapshot lint clean

all: build guest

build:
	$(CARGO) build --release -p kickvm -p kick-floor -p udp-peer

guest:
	@./guest/build.sh

demo: build guest
	@./scripts/demo.sh

# Unit tests of every crate and the end-to-end tests that boot the test guest (needs /dev/kvm).
test: guest
	$(CARGO) test --workspace

# The slow Linux smoke test: the Debian cloud kernel's early boot on this KVM.
test-linux:
	./scripts/fetch-linux.sh
	$(CARGO) test --release --test linux_smoke -- --ignored --nocapture

bench: bench-boot bench-blk bench-blk-pressure bench-net bench-vhost-user bench-snapshot

bench-boot: build guest
	./bench/boot.py

bench-blk: build guest
	./bench/blk.py

bench-blk-pressure: build guest
	./bench/blk_pressure.py

bench-net: build guest
	./bench/net.py

bench-vhost-user: build guest
	./bench/vhost_user.py

bench-snapshot: build guest
	./bench/snapshot.py

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf guest/target

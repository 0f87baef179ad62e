# Tidemill — the front door. `make run` and `make test` are the two commands that matter.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test lint doc fmt

## run: the demo on the embedded in-memory broker (no services needed)
run:
	$(CARGO) run --quiet --example demo

## test: every test (unit, in-memory conformance, adapters against real brokers)
test:
	bash tests/run-all.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

doc:
	$(CARGO) doc --workspace --no-deps

fmt:
	$(CARGO) fmt --all

-include tests/brokers/brokers.mk

.PHONY: bench-memory
## bench-memory: router throughput and peak RSS on the in-memory broker (release build)
bench-memory:
	$(CARGO) bench -p tidemill-core --bench router

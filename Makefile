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

# Raw client vs Tidemill on each real broker (brokers started and stopped around the run).
WITH_BROKERS := bash tests/brokers/with-brokers.sh
.PHONY: bench-kafka bench-amqp bench-nats bench-googlecloud
## bench-kafka: raw rdkafka vs tidemill-kafka on the test Kafka broker
bench-kafka:
	TIDEMILL_BROKERS_ONLY=kafka $(WITH_BROKERS) $(CARGO) bench -p tidemill-kafka --bench throughput
## bench-amqp: raw lapin vs tidemill-amqp on the test RabbitMQ
bench-amqp:
	TIDEMILL_BROKERS_ONLY=rabbitmq $(WITH_BROKERS) $(CARGO) bench -p tidemill-amqp --bench throughput
## bench-nats: raw async-nats vs tidemill-nats (JetStream and core) on the test NATS server
bench-nats:
	TIDEMILL_BROKERS_ONLY=nats $(WITH_BROKERS) $(CARGO) bench -p tidemill-nats --bench throughput
## bench-googlecloud: raw google-cloud-pubsub vs tidemill-googlecloud on the Pub/Sub emulator
bench-googlecloud:
	TIDEMILL_BROKERS_ONLY=pubsub $(WITH_BROKERS) $(CARGO) bench -p tidemill-googlecloud --bench throughput

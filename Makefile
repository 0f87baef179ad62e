# Tidemill — the front door. `make run` and `make test` are the two commands that matter.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test lint doc fmt

## run: the order-flow example on the in-memory broker, or on BROKER=<url> (a real broker)
# examples/order_flow/ checks its own outcome (exit 1 if wrong). No services needed for
# memory; `make run BROKER=kafka://127.0.0.1:9093` (or amqp://, amqps://, nats://,
# pubsub://project?emulator=host:port, redis://, rediss://, postgres://, postgresql://,
# 'sqs://region?endpoint=http://host:port') builds it with the cargo feature the URL's scheme
# names. For sqs:// with an endpoint on this machine (moto: `make brokers-up aws`) and no
# AWS_ACCESS_KEY_ID set, the test credentials of `brokers/brokers.sh env aws` are used.
# The first router demo: cargo run --example demo
run:
	@broker='$(BROKER)'; \
	case "$$broker" in \
	  ''|memory://*|mem://*) features=otel ;; \
	  kafka://*) features=otel,kafka ;; \
	  amqp://*|amqps://*|rabbitmq://*) features=otel,amqp ;; \
	  nats://*) features=otel,nats ;; \
	  pubsub://*|googlecloud://*|gcp://*) features=otel,googlecloud ;; \
	  redis://*|rediss://*) features=otel,redis ;; \
	  postgres://*|postgresql://*) features=otel,postgres ;; \
	  sqs://*|sqs+fifo://*|aws://*) features=otel,aws; \
	    case "$$broker" in \
	      *endpoint=http://127.0.0.1*|*endpoint=http://localhost*) \
	        if [ -z "$${AWS_ACCESS_KEY_ID:-}" ]; then \
	          export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION="$${AWS_REGION:-us-east-1}"; \
	        fi ;; \
	    esac ;; \
	  *) echo "make run: BROKER='$$broker' is not a broker URL (memory://, kafka://, amqp://, amqps://, nats://, pubsub://, redis://, rediss://, postgres://, postgresql://, sqs://, sqs+fifo://)" >&2; exit 2 ;; \
	esac; \
	set -x; $(CARGO) run --quiet --example order_flow $${features:+--features $$features} -- "$${broker:-memory://}"

## test: every test (unit, in-memory conformance, adapters against real brokers)
test:
	bash tests/run-all.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	python3 tests/msrv-check.py

doc:
	$(CARGO) doc --workspace --no-deps

fmt:
	$(CARGO) fmt --all

-include brokers/brokers.mk

.PHONY: bench bench-memory
## bench: every benchmark (memory, raw vs Tidemill on each broker); writes BENCHMARKS.md
bench:
	bash tests/bench-all.sh

## bench-memory: router (plain, and with tracing + metrics), middleware stack and request-reply on the in-memory broker (release)
bench-memory:
	$(CARGO) bench -p tidemill-core --bench router
	$(CARGO) bench -p tidemill-otel --bench router
	$(CARGO) bench -p tidemill-middleware --bench stack
	$(CARGO) bench -p tidemill-middleware --features testing --bench request_reply

# Raw client vs Tidemill on each real broker (brokers started and stopped around the run).
WITH_BROKERS := bash brokers/with-brokers.sh
.PHONY: bench-scaling
## bench-scaling: consume throughput with 1, 2 and 4 consumer processes on the NATS and RabbitMQ clusters and a 6-partition Kafka topic; rewrites its section of BENCHMARKS.md
bench-scaling:
	TIDEMILL_BROKERS_ONLY="kafka nats-cluster rabbitmq-cluster" $(WITH_BROKERS) $(CARGO) bench -p tidemill-failover --bench scaling -- --write-benchmarks

.PHONY: bench-kafka bench-amqp bench-nats bench-googlecloud bench-redis bench-sql bench-postgres bench-aws
## bench-kafka: raw rdkafka vs tidemill-kafka on the test Kafka broker
bench-kafka:
	TIDEMILL_BROKERS_ONLY=kafka $(WITH_BROKERS) $(CARGO) bench -p tidemill-kafka --bench throughput
## bench-amqp: raw lapin vs tidemill-amqp on the test RabbitMQ (publish, consume, batch consume; then consuming through the router with one process per side: CPU and peak RSS per process)
bench-amqp:
	TIDEMILL_BROKERS_ONLY=rabbitmq $(WITH_BROKERS) bash -c '$(CARGO) bench -p tidemill-amqp --bench throughput && $(CARGO) bench -p tidemill-amqp --bench consume'
## bench-nats: raw async-nats vs tidemill-nats (JetStream and core) on the test NATS server
bench-nats:
	TIDEMILL_BROKERS_ONLY=nats $(WITH_BROKERS) bash -c '$(CARGO) bench -p tidemill-nats --bench throughput && $(CARGO) bench -p tidemill-nats --bench request_reply'
## bench-googlecloud: raw google-cloud-pubsub vs tidemill-googlecloud on the Pub/Sub emulator
bench-googlecloud:
	TIDEMILL_BROKERS_ONLY=pubsub $(WITH_BROKERS) $(CARGO) bench -p tidemill-googlecloud --bench throughput
## bench-redis: raw redis-rs vs tidemill-redis on the test Redis
bench-redis:
	TIDEMILL_BROKERS_ONLY=redis $(WITH_BROKERS) $(CARGO) bench -p tidemill-redis --bench throughput
## bench-sql: raw sqlx vs tidemill-sql on the test PostgreSQL (publish, consume, batch consume), and the outbox forwarder to NATS JetStream and Kafka
bench-sql:
	TIDEMILL_BROKERS_ONLY="postgres nats kafka" $(WITH_BROKERS) $(CARGO) bench -p tidemill-sql --bench throughput
## bench-postgres: same as bench-sql
bench-postgres: bench-sql
## bench-aws: raw AWS SDK (aws-sdk-sqs, aws-sdk-sns) vs tidemill-aws on the local AWS API (moto)
bench-aws:
	TIDEMILL_BROKERS_ONLY=aws $(WITH_BROKERS) $(CARGO) bench -p tidemill-aws --bench throughput

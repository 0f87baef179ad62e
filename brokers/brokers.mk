# Test brokers (brokers/). Included by the root Makefile.
#
#   make brokers-up                  install if missing and start all seven single-node brokers
#   make brokers-status              report each one (exit 1 unless all healthy)
#   make brokers-restart NAME=kafka  restart one, keeping its data
#   make brokers-restart kafka       (same; so is NAME="nats kafka")
#   make brokers-down                stop all; no process or port left
#   make brokers-up-cluster          start the three-node NATS and RabbitMQ clusters
#   make brokers-down-cluster        stop them
#
# Every target takes NAME=... (or trailing broker names) to act on some only:
# rabbitmq, nats, kafka, pubsub, redis, postgres, aws (and nats-cluster, rabbitmq-cluster).

BROKERS_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
BROKERS_SH := bash $(BROKERS_MK_DIR)/brokers.sh
BROKER_NAMES := rabbitmq nats kafka pubsub redis postgres aws nats-cluster rabbitmq-cluster
CLUSTER_NAMES := nats-cluster rabbitmq-cluster
BROKER_ARGS = $(NAME) $(filter $(BROKER_NAMES),$(MAKECMDGOALS))

.PHONY: brokers-up brokers-down brokers-status brokers-restart brokers-up-cluster brokers-down-cluster

## brokers-up-cluster: install (first time) and start the three-node NATS JetStream and RabbitMQ clusters
brokers-up-cluster:
	@$(BROKERS_SH) up $(or $(strip $(BROKER_ARGS)),$(CLUSTER_NAMES))

## brokers-down-cluster: stop the clusters started by brokers-up-cluster
brokers-down-cluster:
	@$(BROKERS_SH) down $(or $(strip $(BROKER_ARGS)),$(CLUSTER_NAMES))

## brokers-up: install (first time) and start RabbitMQ, NATS, Kafka (Nisshi), Pub/Sub emulator, Redis, PostgreSQL, the local AWS API (moto)
brokers-up:
	@$(BROKERS_SH) up $(BROKER_ARGS)

## brokers-down: stop the brokers started by brokers-up
brokers-down:
	@$(BROKERS_SH) down $(BROKER_ARGS)

## brokers-status: health of each broker
brokers-status:
	@$(BROKERS_SH) status $(BROKER_ARGS)

## brokers-restart NAME=...: restart a broker, keeping its data
brokers-restart:
	@$(BROKERS_SH) restart $(BROKER_ARGS)

# `make brokers-restart kafka`: the broker names given as goals are arguments,
# not things to build.
ifneq ($(filter brokers-%,$(MAKECMDGOALS)),)
.PHONY: $(filter $(BROKER_NAMES),$(MAKECMDGOALS))
$(filter $(BROKER_NAMES),$(MAKECMDGOALS)):
	@:
endif

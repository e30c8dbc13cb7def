# The two commands a newcomer needs are `make demo` and `make test`; the rest are their parts.
SHELL := /bin/bash
CARGO ?= cargo
# Integration tests share one broker; a few at a time keeps 2 cores responsive.
TEST_THREADS ?= 4

.PHONY: browser cluster-up cluster-down test-cluster tls-stack-up tls-stack-down fuzz help demo test k8s-test helm-check image image-test image-test-run stack-up stack-down stack-status build lint fmt clippy unit bench clean-stack

help:
	@echo "make demo        run the pipeline locally and watch tickets being triaged"
	@echo "make test        start the local stack, then fmt, clippy and the whole test suite"
	@echo "make stack-up    start Kafka (KRaft), Redis and PostgreSQL on loopback (idempotent)"
	@echo "make stack-down  stop them"
	@echo "make tls-stack-up  a TLS-only Kafka (SASL_SSL, mTLS), Redis and PostgreSQL on their own ports"
	@echo "make clean-stack stop them and delete their data (every test run leaves its topics and schemas)"
	@echo "make bench       run the benchmarks recorded in docs/BENCHMARKS.md (BENCH=name for one)"
	@echo "make chaos       kill workers, restart broker/Redis/PostgreSQL, LLM outage; check nothing is lost"
	@echo "                 BROKERS=3: on the three-broker cluster, killing partition leaders and the"
	@echo "                 transaction coordinator, then a rolling restart"
	@echo "make cluster-up  a three-broker KRaft cluster on 19092-19094 beside the stack (cluster-down stops it)"
	@echo "make helm-check  lint, render and validate the Helm chart (installs helm into .local/bin)"
	@echo "make fuzz        long property-test runs of every parser of outside input (FUZZ_CASES=100000)"
	@echo "make k8s-test    install the chart into a real kube-apiserver on loopback; HPAs scale on real lag"
	@echo "make image       build the container image with podman (release binaries; IMAGE_PROFILE=dev for debug)"
	@echo "make image-test  build it from the debug binaries and run it as the chart does (part of make test)"

stack-up:
	@deploy/stack.sh up

stack-down:
	@deploy/stack.sh down

# Headless Chromium and chromedriver for the console's browser tests (apt-get when missing).
browser:
	@deploy/browser.sh

stack-status:
	@deploy/stack.sh status

# Kafka (SASL_SSL + mTLS), Redis (TLS only) and PostgreSQL (ssl=on) with fresh certificates, on
# ports of their own beside the plain stack; `make test` starts and stops it around the tests.
tls-stack-up: stack-up
	@deploy/tls-stack.sh up

tls-stack-down:
	@deploy/tls-stack.sh down

clean-stack:
	@deploy/stack.sh wipe

build:
	$(CARGO) build --workspace --bins

fmt:
	$(CARGO) fmt --all

lint:
	@deploy/check-target-paths.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests named serial_* measure time (throughput against a rate limit), so they run alone, after
# the rest. Tests named cluster_* (the chaos run, the dispatch stage's exactly-once under kill -9)
# run on the three-broker cluster (test-cluster, below). The TLS tests (named tls_*) need the TLS
# stack: a second Kafka, Redis and PostgreSQL on their own ports with fresh certificates
# (deploy/tls-stack.sh, about 25 s to start); it is stopped as soon as the main run is over,
# passed or failed. The end-to-end tests start the service binaries; the image test last starts
# them again as containers (image-test-run, below).
test: stack-up lint helm-check browser
	$(CARGO) build --workspace --bins
	@deploy/tls-stack.sh up
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS) --skip serial_ --skip cluster_; \
	  status=$$?; deploy/tls-stack.sh down; exit $$status
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=1 serial_ --skip cluster_
	@$(MAKE) --no-print-directory test-cluster
	@$(MAKE) --no-print-directory image-test-run
	@$(MAKE) --no-print-directory k8s-test

# The chart installed into a real kube-apiserver v1.37.2 on loopback (etcd, apiserver and
# controller-manager built from the Go module proxy into .local/k8s/bin on first use, about
# 11 minutes cold), with the real lag-autoscaler on the real broker: HPAs and direct mode scale
# on real lag, the External Metrics API refuses strangers, upgrade/uninstall leave no orphans.
k8s-test: stack-up helm-check
	@CARGO=$(CARGO) deploy/k8s/test.sh

# The property tests of every parser of outside input (provider headers and bodies, the record
# decoders of every stage, the HTTP ingress) run 512 cases each in make test; this runs many more.
FUZZ_CASES ?= 100000
fuzz: stack-up
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p triage-proto --test decode_props
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p inference-worker --lib no_provider_header
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test -p ticket-publisher --test decoding_props

# helm lint/template of every value set, offline schema validation (Kubernetes 1.33), compose and
# Dockerfile checks; installs helm into .local/bin on first use. The chart's Rust tests need it.
helm-check:
	@deploy/helm-check.sh

# The runtime image, built with podman from the Dockerfile's `prebuilt` path on a Debian base made
# here (deploy/image.sh). Release binaries by default: a release build of the workspace first
# (6–45 min on 2 cores, depending on what else runs; docs/BENCHMARKS.md).
IMAGE_PROFILE ?= release
image:
	@deploy/image.sh --profile $(IMAGE_PROFILE)

# The image from the dev-profile binaries `make test` has already built (a release build would add
# minutes to CI), run under the chart's conditions against the local stack. Same Dockerfile and
# runtime stage as `make image`; only the binaries' optimisation differs.
IMAGE_TEST_PROFILE ?= dev
# One tag per clone: worktrees on one machine share podman's image store.
IMAGE_TEST_NAME ?= localhost/ticket-triage:test-$(shell basename "$(CURDIR)" | tr -c 'A-Za-z0-9_.\n-' '-')
image-test: stack-up helm-check image-test-run

image-test-run:
	@deploy/image.sh --profile $(IMAGE_TEST_PROFILE) --image $(IMAGE_TEST_NAME)
	TRIAGE_IMAGE=$(IMAGE_TEST_NAME) $(CARGO) test --workspace --test image -- --ignored --nocapture

demo: stack-up
	@deploy/demo.sh

bench: stack-up
	@deploy/bench.sh $(BENCH)

# The three-broker KRaft cluster (deploy/stack.sh up --brokers 3) on 19092-19094 (KAFKA_CLUSTER_PORT
# moves them), sharing the stack's Redis and PostgreSQL. Tests and tools find it through
# STACK_ENV_FILE=.local/cluster.env.
cluster-up: stack-up
	@deploy/stack.sh up --brokers 3

cluster-down:
	@deploy/stack.sh --brokers 3 down

# The cluster_* tests on three brokers: the chaos run (leader and coordinator kills, a rolling
# restart, besides the worker kills and Redis/PostgreSQL restarts) and exactly-once dispatch
# under kill -9. The cluster is stopped afterwards, passed or not.
test-cluster: stack-up
	@deploy/stack.sh up --brokers 3
	@STACK_ENV_FILE=.local/cluster.env $(CARGO) test --workspace --no-fail-fast -- --test-threads=1 cluster_; \
	  status=$$?; deploy/stack.sh --brokers 3 down; exit $$status

# Restarts the broker, Redis and PostgreSQL: run it alone. CHAOS_ARGS e.g. --tickets 5000.
# BROKERS=3 runs it on the three-broker cluster (started first, left running).
BROKERS ?= 1
chaos: stack-up
ifeq ($(BROKERS),1)
	$(CARGO) run --quiet -p pipeline -- chaos $(CHAOS_ARGS)
else
	@deploy/stack.sh up --brokers $(BROKERS)
	STACK_ENV_FILE=.local/cluster.env $(CARGO) run --quiet -p pipeline -- chaos $(CHAOS_ARGS)
endif

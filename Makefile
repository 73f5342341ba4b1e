# carelog developer entry points. `make help` lists them.
# The local stack (PostgreSQL 15, Redis, Kafka 3.9 KRaft, app services) runs natively
# under .stack/ via ops/local/stack.sh; settings live in ops/local/dev.env.

SHELL := /bin/bash
.DEFAULT_GOAL := help

STACK := ops/local/stack.sh
# Export the dev.env settings into a recipe line's shell.
WITH_ENV := eval "$$($(STACK) env)";

# What `make test` / `make bench` bring up first: `up` (infra + app services) or `infra`.
STACK_UP ?= up
# Extra arguments: make test PYTEST_ARGS='-k projection -x'; make bench BENCH_ARGS='...'
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Set (e.g. by .ci/run) to accept pytest's exit status 5, "no tests collected".
NO_TESTS_OK ?=

.PHONY: help install up infra down status logs reset observe observe-down test test-unit fuzz bench lint schemas proto synth clean

help: ## Show the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{ printf "  %-10s %s\n", $$1, $$2 }'

install: ## Install Debian packages, uv, the Python env and the Kafka jars (idempotent)
	@ops/local/install.sh

up: ## Start infra (PostgreSQL, Redis, Kafka) and the app services
	@$(STACK) up

infra: ## Start PostgreSQL, Redis and Kafka only
	@$(STACK) infra

down: ## Stop the app services, then the infra
	@$(STACK) down

status: ## Show what runs where
	@$(STACK) status || true

logs: ## Follow all stack logs (tail -F .stack/logs/*.log)
	@$(STACK) logs

reset: ## Stop everything and delete the stack's data under .stack/
	@$(STACK) reset

observe: ## Start Prometheus on :9090 scraping the stack, with the alert rules (idempotent)
	@ops/local/observe.sh up

observe-down: ## Stop the Prometheus of `make observe`
	@ops/local/observe.sh down

test: ## Start the stack, check the import contracts, run the whole pytest suite against it
	@$(STACK) $(STACK_UP)
	@ops/local/observe.sh install
	@set -o pipefail; uv run --quiet lint-imports --no-cache | tail -n 3
	@$(WITH_ENV) rc=0; uv run pytest $(PYTEST_ARGS) || rc=$$?; \
	if [[ $$rc == 5 && -n "$(NO_TESTS_OK)" ]]; then \
	  echo "make test: pytest collected no tests (exit 5); accepted because NO_TESTS_OK is set"; rc=0; \
	fi; exit $$rc

test-unit: ## Run the unit tests only (no services needed)
	@uv run pytest tests/unit $(PYTEST_ARGS)

# Random cases per operation in `make fuzz` (make test runs 15).
FUZZ_EXAMPLES ?= 300

fuzz: ## Start the stack, then fuzz every HTTP API longer than make test does (FUZZ_EXAMPLES per operation)
	@$(STACK) $(STACK_UP)
	@$(WITH_ENV) CARELOG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) uv run pytest tests/security/test_fuzz.py $(PYTEST_ARGS)

bench: ## Start the stack, then run the benchmarks (python -m bench)
	@$(STACK) $(STACK_UP)
	@$(WITH_ENV) uv run python -m bench $(BENCH_ARGS)

lint: ## ruff check, ruff format --check, mypy, the import contracts (lint-imports)
	@uv run ruff check . && uv run ruff format --check . && uv run mypy && uv run lint-imports

schemas: ## Regenerate schemas/: the event JSON Schemas and the AsyncAPI document (carelog schemas write)
	@$(WITH_ENV) uv run carelog schemas write

# Where `make proto` writes billing's generated gRPC code (tests regenerate elsewhere to compare).
PROTO_OUT ?= billing-grpc/billing_grpc/generated

proto: ## Regenerate billing's gRPC code (betterproto2) from proto/
	@rm -rf $(PROTO_OUT)/carelog $(PROTO_OUT)/google && mkdir -p $(PROTO_OUT)
	@uv run python -m grpc_tools.protoc -I proto --python_betterproto2_out=$(PROTO_OUT) \
	  --python_betterproto2_opt=server_generation=async,client_generation=async,google_protobuf_descriptors \
	  $$(find proto -name '*.proto' | LC_ALL=C sort)

synth: ## Synthesise the AWS stack (ops/aws, AWS CDK) into ops/aws/cdk.out; no AWS account needed
	@cd ops/aws && npx --yes aws-cdk@2 synth --quiet

clean: ## Remove caches and bytecode (keeps .venv and the stack; see `make reset`)
	@rm -rf .pytest_cache .ruff_cache .mypy_cache .hypothesis build dist
	@find . -path ./.venv -prune -o -path ./.git -prune -o -path ./.stack -prune -o \
	  -type d -name __pycache__ -print0 | xargs -0r rm -rf

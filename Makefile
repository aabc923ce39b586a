# splitstack: every target that runs code first runs the idempotent set-up step (tools/setup.sh).
.PHONY: setup proto proto-check proto-snapshot up down status demo test fuzz bench deploy-check pants clean

VENV := .venv
PY := $(VENV)/bin/python
SPLITSTACK := $(VENV)/bin/splitstack

setup:
	@tools/setup.sh

proto: setup
	@tools/gen_proto.sh

## Contracts only grow: fail on a removed/renumbered field or changed type vs the committed snapshot.
proto-check: setup
	@$(PY) tools/proto_compat.py check

## After an intended, compatible contract change: record the new snapshot (commit it).
proto-snapshot: setup
	@$(PY) tools/proto_compat.py snapshot

## The embedded stack: NATS with JetStream and every installed service as local processes.
up: setup
	@$(SPLITSTACK) up
	@$(SPLITSTACK) status

down: setup
	@$(SPLITSTACK) down

status: setup
	@$(SPLITSTACK) status

## The main job: the platform end to end on its own embedded stack in state/demo (wiped first, stopped
## at the end): data, training, conversion, promotion, serving, retraining on new data, hot swap under load.
demo: setup
	@$(SPLITSTACK) demo

## Every test: contracts compatibility, deploy manifests and images, libs, services, cross-service.
test: setup proto-check deploy-check
	@$(PY) -m pytest $(PYTEST_ARGS)

## Property-based fuzzing of every RPC and event consumer against a real stack, longer than the bounded run of
## `make test` (FUZZ_EXAMPLES inputs per RPC, default 500); writes docs/fuzz.md (cases, statuses, findings).
FUZZ_EXAMPLES ?= 500
fuzz: setup
	@SPLITSTACK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SPLITSTACK_FUZZ_REPORT=docs/fuzz.md $(PY) -m pytest tests/fuzz -q $(PYTEST_ARGS)

## deploy/k8s: render every overlay, validate it strictly offline, check it against the services' configs
## and the contracts, lint the Dockerfiles (see deploy/k8s/README.md).
deploy-check: setup
	@$(PY) -m tools.deploy_check

## Benchmarks, never part of `make test`; each writes its report under docs/bench/.
bench: setup
	@$(PY) services/converter/bench/bench_converter.py
	@$(PY) services/trainer/bench/bench_trainer.py
	@$(PY) tests/bench/serving/bench_serving.py

## Pants (tools/pants.sh bootstraps 2.17.1 and its tools here; never part of `make test`): every
## target, the dependency graph with the visibility rules enforced, and tests/pants (the rules broken
## on purpose in a copy of the repo; the protobuf codegen). About 4 minutes the first time here, 2 after.
pants: setup
	@tools/pants.sh --check

clean:
	rm -rf $(VENV) state libs/contracts/src/.generated .pants-venv .pants-tools pants.local.toml
	find libs -name '*_pb2*.py*' -delete

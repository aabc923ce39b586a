# splitstack: every target that runs code first runs the idempotent set-up step (tools/setup.sh).
.PHONY: setup proto proto-check proto-snapshot up down status test test-fast bench deploy-check clean

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

## Every test: contracts compatibility, libs, services, cross-service.
test: setup proto-check
	@$(PY) -m pytest $(PYTEST_ARGS)

## Benchmarks, never part of `make test`; each writes its report under docs/bench/.
bench: setup
	@$(PY) services/converter/bench/bench_converter.py
	@$(PY) services/trainer/bench/bench_trainer.py
	@$(PY) tests/bench/serving/bench_serving.py

clean:
	rm -rf $(VENV) state libs/contracts/src/.generated
	find libs -name '*_pb2*.py*' -delete

"""Every RPC of the four services, fuzzed against the running stack; then the stack's invariants.

For each service, each of its RPCs gets `SPLITSTACK_FUZZ_EXAMPLES` inputs (generic hostile messages and
near-valid ones, see `fuzz_rpcs.requests`). A call must end with a clear status: never INTERNAL or UNKNOWN,
never a hang (a call still running after a minute), and the service process must still be alive. After the
service's RPCs: no half-stored record in the registry, and events still flow through the parts the service
owns (a canary event is handled).
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given

from fuzz_report import EXAMPLES, Finding, FuzzLog, fuzz_settings, timeout_for
from fuzz_rpcs import Outcome, Rpc, acceptable, call, describe, iter_rpcs, requests
from fuzz_stack import DYNAMIC, SERVED, FuzzStack
from inference import grpc_service_pb2 as ipb
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

SERVICES = ("registry", "trainer", "converter", "serving")
FOLLOWED = (SERVED, DYNAMIC)
CANARIES = {"registry": ("canary_data", "canary_promotion"), "trainer": ("canary_data",),
            "converter": ("canary_conversion",), "serving": ("canary_promotion",)}


class BadOutcome(AssertionError):
    """A call ended with a status no client input may cause, or its service died."""

    def __init__(self, problem: str, request: object) -> None:
        super().__init__(problem)
        self.problem, self.request = problem, request


def after_call(stack: FuzzStack, rpc: Rpc, request: object, outcome: Outcome) -> None:
    """Undo what a successful call started that would load the machine or hide later paths."""
    if outcome.code != grpc.StatusCode.OK:
        return
    if rpc.name == "trainer.SubmitJob" and outcome.responses:
        stack.trainer.CancelJob(tpb.CancelJobRequest(id=outcome.responses[0].id, reason="fuzz"), timeout=60)
    elif rpc.name in ("serving.RepositoryModelUnload", "serving.RepositoryModelLoad"):
        if getattr(request, "model_name", "") in FOLLOWED:
            stack.restore_served(request.model_name)
    elif rpc.name in ("registry.SetAlias", "registry.DeleteAlias", "registry.SetPromotionPolicy"):
        if getattr(request, "model", "") in FOLLOWED:
            stack.restore_served(request.model)


def fuzz_rpc(stack: FuzzStack, rpc: Rpc, log: FuzzLog) -> Finding | None:
    """Send `rpc` its fuzzed inputs; the finding (minimal input when shrinking) if one misbehaved."""
    channel = stack.channels[rpc.service]

    @fuzz_settings()
    @given(requests(rpc, stack.seeds))
    def no_bad_status(request: object) -> None:
        process = stack.stack.current[rpc.service]
        outcome = call(channel, rpc, request)
        log.record(rpc.name, outcome.status)
        if process.proc.poll() is not None:
            stack.revive()   # restarted at once, so shrinking replays inputs against a live process
            raise BadOutcome(f"the {rpc.service} process died (exit {process.proc.returncode})", request)
        if not acceptable(rpc, outcome):
            detail = outcome.details or "; ".join(outcome.in_band_errors)
            raise BadOutcome(f"{outcome.status}: {detail[:300]}", request)
        after_call(stack, rpc, request, outcome)

    try:
        no_bad_status()
    except BadOutcome as exc:
        stack.revive()
        return log.find(Finding(rpc.name, exc.problem, describe(exc.request)))
    return None


def check_stack(stack: FuzzStack, service: str, log: FuzzLog) -> list[Finding]:
    """The invariants after fuzzing `service`: processes alive, registry consistent, canaries handled."""
    found = [log.find(Finding(f"stack after {service}", f"{name} process died; restarted"))
             for name in stack.revive()]
    stack.cleanup_work()
    found += [log.find(Finding(f"stack after {service}", f"half-stored record: {problem}"))
              for problem in stack.registry_inconsistencies() + stack.listed_but_unreadable()]
    for canary in CANARIES[service]:
        try:
            getattr(stack, canary)()
        except AssertionError as exc:
            found.append(log.find(Finding(f"stack after {service}", f"events stalled: {canary}: {exc}")))
    return found


@pytest.mark.fuzz
@pytest.mark.parametrize("service", [pytest.param(s, marks=pytest.mark.timeout(timeout_for(len(list(iter_rpcs(s))))))
                                     for s in SERVICES])
def test_no_input_gets_a_bad_status_or_breaks_the_stack(service: str, fuzz_stack: FuzzStack, fuzz_log: FuzzLog) -> None:
    rpcs = list(iter_rpcs(service))
    findings = [f for rpc in rpcs if (f := fuzz_rpc(fuzz_stack, rpc, fuzz_log))]
    findings += check_stack(fuzz_stack, service, fuzz_log)
    assert all(fuzz_log.cases[r.name] for r in rpcs), "every RPC got at least one input"
    assert not findings, "\n".join(f.line() for f in findings)


def test_the_catalogue_covers_every_rpc_of_every_service() -> None:
    """The fuzzer reads the RPCs from the contracts: each service's full API is in it."""
    counts = {s: len(list(iter_rpcs(s))) for s in SERVICES}
    assert counts["registry"] == len(rpb.DESCRIPTOR.services_by_name["Registry"].methods) >= 25
    assert counts["serving"] == len(ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods)
    assert "ModelStreamInfer" in {r.method.name for r in iter_rpcs("serving")}
    assert counts["trainer"] >= 10 and counts["converter"] >= 5
    assert EXAMPLES >= 1

"""The loop survives a kill -9 of any one process at its worst moment. Each test runs its own stack,
arms a crash point (chassis faults) in one service, asserts the process died there (nats-server, which
has no crash points, is SIGKILLed by the test mid loop), restarts it, and checks that the loop
completed: one version per training, one conversion and serving choice per target, every event
exactly once, no partial artifact, and no failed prediction except while serving itself was down.

Each stack starts from version 1 of MODEL promoted and served: the shared stack's trained champion,
seeded before the converter starts (registered, with its cpu FP32 ONNX and serving choice written as
the cpu pool would) and with a deliberately modest recorded accuracy (0.5). Where the subject is not
training, version 2 is the same hand-off with its real accuracy; the registry's AUTO policy promotes
version 2 whatever the run's noise, and the real converter converts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from e2e_checks import check_loop, check_predictions
from e2e_clients import Predictor, events_on, stored_events
from e2e_stack import wait_until
from e2e_support import (
    Champion, Clients, Digits, NewStack, auto_model, job_spec, settle, wait_alias, wait_choice, wait_job, wait_served,
)

from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.registry.v1 import registry_pb2 as rpb

pytestmark = pytest.mark.timeout(600)   # several processes start, train and convert per test

MODEL = "digits"
MODEST = 0.5
NO_TRAINER = ("registry", "converter", "serving")


def modest_champion(champion: Champion) -> Callable[[Clients], int]:
    """A stack seed: MODEL created (AUTO) and version 1 complete for cpu, with recorded accuracy MODEST."""
    def seed(api: Clients) -> int:
        api.registry.create_model(auto_model(MODEL))
        return champion.handoff.seed(api.registry, MODEL, accuracy=MODEST)
    return seed


def champion_served(api: Clients) -> int:
    """Wait until the seeded version 1 is production and served."""
    wait_alias(api.registry, MODEL, 1)
    wait_served(api.serving, MODEL, 1)
    return 1


def promoted_and_served(api: Clients, version: int) -> str:
    """Wait until `version` is production and served; the served digest (that of its cpu choice)."""
    choice = wait_choice(api.registry, MODEL, version)
    wait_alias(api.registry, MODEL, version)
    assert api.registry.version(MODEL, version).promotion.outcome == rpb.PromotionDecision.PROMOTED
    served = wait_served(api.serving, MODEL, version)
    assert served == choice.artifact.sha256
    return served


def test_trainer_killed_mid_job_resumes_to_exactly_one_version(new_stack: NewStack, champion: Champion,
                                                                 digits: Digits) -> None:
    stack, api = new_stack([MODEL], crash_points={"trainer": ["trainer.mid_job"]}, seed=modest_champion(champion))
    first = champion_served(api)
    api.registry.create_dataset("digits")
    api.registry.upload_dataset("digits", digits.dataset(1000))
    inputs, _ = digits.held_out
    with Predictor(stack.address("serving"), MODEL, inputs[:8]) as predictor:
        job = api.trainer.submit(job_spec(MODEL, "digits", max_epochs=4))
        stack.wait_killed("trainer", "trainer.mid_job")
        assert [v.version for v in api.registry.versions(MODEL)] == [first]
        stack.start("trainer")
        done = wait_job(api.trainer, job.id)
        assert done.attempts == 2 and done.model_version == first + 1, done
        promoted_and_served(api, done.model_version)
        predictor.wait_answered(str(done.model_version))
    check_predictions(predictor)
    assert [v.version for v in api.registry.versions(MODEL)] == [first, first + 1]
    settle()
    check_loop(api.registry, stored_events(stack.nats_url), MODEL, trainer=api.trainer)


def test_converter_killed_mid_conversion_converts_once_after_restart(new_stack: NewStack,
                                                                     champion: Champion, digits: Digits) -> None:
    stack, api = new_stack([MODEL], NO_TRAINER, {"converter": ["converter.mid_conversion"]},
                           seed=modest_champion(champion))
    first = champion_served(api)
    inputs, _ = digits.held_out
    with Predictor(stack.address("serving"), MODEL, inputs[:8]) as predictor:
        second = champion.handoff.register(api.registry, MODEL)
        stack.wait_killed("converter", "converter.mid_conversion")
        assert not api.registry.version(MODEL, second).serving_choices
        stack.start("converter")
        promoted_and_served(api, second)
        predictor.wait_answered(str(second))
    check_predictions(predictor)
    conversions = api.converter.conversions(MODEL)
    assert [(c.version, c.target, c.state) for c in conversions] == [(first, "cpu", cpb.SUCCEEDED),
                                                                     (second, "cpu", cpb.SUCCEEDED)]
    assert conversions[0].serving_choice.reason.startswith("e2e seed")     # found written, not converted
    settle()
    check_loop(api.registry, stored_events(stack.nats_url), MODEL)


def test_registry_killed_after_the_promoting_commit_announces_everything_once(
        new_stack: NewStack, champion: Champion, digits: Digits) -> None:
    """Commits with events: v1 finalized (1), v1 serving choice + promotion (2), v2 finalized (3), v2
    serving choice + its promotion (4): the registry dies right after the 4th, before its relay runs."""
    stack, api = new_stack([MODEL], NO_TRAINER, {"registry": ["registry.after_commit@4"]},
                           seed=modest_champion(champion))
    first = champion_served(api)
    inputs, _ = digits.held_out
    with Predictor(stack.address("serving"), MODEL, inputs[:8]) as predictor:
        second = champion.handoff.register(api.registry, MODEL)
        stack.wait_killed("registry", "registry.after_commit")
        stack.start("registry")
        promoted_and_served(api, second)
        predictor.wait_answered(str(second))
    check_predictions(predictor)       # serving kept serving while the registry was down
    assert [m.to_version for m in api.registry.history(MODEL)] == [first, first, second, second]
    settle()
    check_loop(api.registry, stored_events(stack.nats_url), MODEL)


def test_serving_killed_mid_swap_serves_the_new_version_after_restart(new_stack: NewStack,
                                                                      champion: Champion, digits: Digits) -> None:
    stack, api = new_stack([MODEL], NO_TRAINER, {"serving": ["serving.mid_swap"]}, seed=modest_champion(champion))
    first = champion_served(api)
    inputs, _ = digits.held_out
    with Predictor(stack.address("serving"), MODEL, inputs[:8]) as predictor:
        second = champion.handoff.register(api.registry, MODEL)
        stack.wait_killed("serving", "serving.mid_swap")
        died = time.monotonic()
        stack.start("serving")
        promoted_and_served(api, second)
        back = time.monotonic()
        predictor.wait_answered(str(second))
    check_predictions(predictor, down=[(died - 0.5, back)])
    assert predictor.versions() == [str(first), str(second)]
    settle()
    events = stored_events(stack.nats_url)
    check_loop(api.registry, events, MODEL)
    deployed = [(e.payload.version, e.payload.previous_version) for e in events_on(stack.nats_url, "model.deployed.")]
    assert deployed == [(first, 0), (second, 0)], deployed     # the crashed swap announced nothing


def test_nats_killed_mid_loop_loses_no_event(new_stack: NewStack, champion: Champion, digits: Digits) -> None:
    stack, api = new_stack([MODEL], NO_TRAINER, seed=modest_champion(champion))
    first = champion_served(api)
    inputs, _ = digits.held_out
    with Predictor(stack.address("serving"), MODEL, inputs[:8]) as predictor:
        second = champion.handoff.register(api.registry, MODEL)
        wait_until(lambda: len(events_on(stack.nats_url, "model.registered.")) == 2, 30, "model.registered v2")
        assert stack.kill_nats() == -9
        assert not api.registry.version(MODEL, second).serving_choices     # mid loop: v2 not converted yet
        time.sleep(2.0)
        stack.start_nats()
        promoted_and_served(api, second)
        predictor.wait_answered(str(second))
    check_predictions(predictor)
    settle()
    events = stored_events(stack.nats_url)
    check_loop(api.registry, events, MODEL)
    deployed = [(e.payload.version, e.payload.previous_version) for e in events
                if e.subject.startswith("model.deployed.")]
    assert deployed == [(first, 0), (second, first)], deployed

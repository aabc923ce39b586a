"""The conversion store: claims, leases, terminal records and their events, on SQLite (two engines on
one file, as two replicas would have) and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import select

from splitstack.chassis.outbox import Outbox
from splitstack.converter.v1 import converter_pb2 as pb
from splitstack.events.v1 import events_pb2
from splitstack.chassis.db import open_engine
from splitstack_converter.store import ConversionStore, conversion_id, outbox

LEASE = dt.timedelta(seconds=30)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> list[ConversionStore]:
    """Two stores (two replicas' engines) on one database."""
    url = f"sqlite:///{tmp_path / 'converter.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    made = [ConversionStore(open_engine(url), Outbox(outbox, "converter/test")) for _ in range(2)]
    made[0].create_schema()
    made[1].create_schema()
    yield made
    for store in made:
        store.engine.dispose()


def record(model: str = "digits", version: int = 1) -> pb.Conversion:
    return pb.Conversion(id=conversion_id(model, version, "cpu"), model=model, version=version, target="cpu")


def events(store: ConversionStore) -> list[str]:
    with store.engine.connect() as conn:
        return [row.subject for row in conn.execute(select(outbox.c.subject).order_by(outbox.c.id))]


def test_one_claim_at_a_time_and_takeover_after_the_lease(stores: list[ConversionStore]) -> None:
    a, b = stores
    first = a.claim(record(), "a", "ev-1", False, T0, LEASE)
    assert (first.outcome, first.attempt, first.stored.record.state) == ("claimed", 1, pb.RUNNING)
    busy = b.claim(record(), "b", "ev-2", False, T0 + dt.timedelta(seconds=5), LEASE)
    assert busy.outcome == "busy" and busy.stored.owner == "a"
    assert a.renew(first.stored.record.id, "a", 1, T0 + dt.timedelta(seconds=60))
    assert b.claim(record(), "b", "ev-2", False, T0 + dt.timedelta(seconds=45), LEASE).outcome == "busy"
    taken = b.claim(record(), "b", "ev-2", False, T0 + dt.timedelta(seconds=61), LEASE)
    assert (taken.outcome, taken.attempt) == ("claimed", 2)
    # The first owner has lost its claim: no progress, renewal or result of its attempt is stored.
    assert not a.progress(taken.stored.record.id, "a", 1, lambda r: setattr(r, "stage", "gate"))
    assert not a.renew(taken.stored.record.id, "a", 1, T0 + dt.timedelta(seconds=90))
    assert b.progress(taken.stored.record.id, "b", 2, lambda r: setattr(r, "stage", "gate"))
    stored = a.get(taken.stored.record.id)
    assert stored.record.stage == "gate" and stored.owner == "b" and stored.revision >= 3


def test_done_conversions_are_not_claimed_again(stores: list[ConversionStore]) -> None:
    a, b = stores
    claim = a.claim(record(), "a", "ev-1", False, T0, LEASE)
    succeeded = pb.Conversion()
    succeeded.CopyFrom(claim.stored.record)
    succeeded.state = pb.SUCCEEDED
    final = a.finish(succeeded, T0 + dt.timedelta(seconds=3), owner="a", attempt=1)
    assert final.finished_at.ToDatetime(dt.timezone.utc) == T0 + dt.timedelta(seconds=3)
    assert final.requested_at.ToDatetime(dt.timezone.utc) == T0
    assert b.claim(record(), "b", "ev-2", True, T0 + dt.timedelta(hours=1), LEASE).outcome == "done"
    assert b.request(record(), T0, lambda conn: pytest.fail("no event for a converted version")).state == pb.SUCCEEDED


def test_failed_conversions_rerun_only_on_a_new_request(stores: list[ConversionStore]) -> None:
    a, b = stores
    claim = a.claim(record(), "a", "ev-1", False, T0, LEASE)
    failed = pb.Conversion()
    failed.CopyFrom(claim.stored.record)
    failed.state, failed.error = pb.FAILED, "export failed"
    event = events_pb2.ConversionFailed(model="digits", version=1, target="cpu", stage="export", reason="x")
    a.finish(failed, T0, a.event_adder("conversion.failed.digits.cpu", event, "failed-1"), owner="a", attempt=1)
    assert events(a) == ["conversion.failed.digits.cpu"]
    assert b.claim(record(), "b", "ev-1", False, T0, LEASE).outcome == "done"      # the same announcement
    assert b.claim(record(), "b", "ev-9", False, T0, LEASE).outcome == "done"      # model.registered: once
    assert b.claim(record(), "b", "ev-1", True, T0, LEASE).outcome == "done"       # the request that failed
    rerun = b.claim(record(), "b", "req-2", True, T0, LEASE)
    assert (rerun.outcome, rerun.attempt) == ("claimed", 2) and not rerun.stored.record.error


def test_a_lost_claim_cannot_write_a_result(stores: list[ConversionStore]) -> None:
    a, b = stores
    a.claim(record(), "a", "ev-1", False, T0, LEASE)
    b.claim(record(), "b", "ev-1", False, T0 + LEASE * 2, LEASE)
    late = pb.Conversion()
    late.CopyFrom(record())
    late.state = pb.FAILED
    kept = a.finish(late, T0, a.event_adder("conversion.failed.digits.cpu", events_pb2.ConversionFailed()),
                    owner="a", attempt=1)
    assert kept.state == pb.RUNNING and events(a) == []


def test_requests_commit_with_their_event(stores: list[ConversionStore]) -> None:
    a, _ = stores
    payload = events_pb2.ConversionRequested(model="digits", version=1, target="cpu")
    requested = a.request(record(), T0, a.event_adder("conversion.requested.digits.cpu", payload))
    assert requested.state == pb.REQUESTED and events(a) == ["conversion.requested.digits.cpu"]
    claimed = a.claim(record(), "a", "req-1", True, T0 + dt.timedelta(seconds=1), LEASE)
    assert claimed.outcome == "claimed" and claimed.stored.record.requested_at.ToDatetime(dt.timezone.utc) == T0
    # While the claim is live, another request returns the running record and announces nothing.
    assert a.request(record(), T0, a.event_adder("conversion.requested.digits.cpu", payload)).state == pb.RUNNING
    assert len(events(a)) == 1


def test_racing_claims_have_one_winner(stores: list[ConversionStore]) -> None:
    a, b = stores
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: (a, b)[i % 2].claim(record("race"), f"r{i}", f"ev-{i}", False, T0, LEASE),
                                 range(8)))
    assert sorted(c.outcome for c in outcomes) == ["busy"] * 7 + ["claimed"]


def test_pages_by_target_model_and_version(stores: list[ConversionStore]) -> None:
    a, _ = stores
    for model, version in (("b", 2), ("a", 10), ("a", 2), ("b", 1)):
        a.request(record(model, version), T0, lambda conn: None)
    assert [r.id for r in a.page("", "", None, 10)] == ["a.2.cpu", "a.10.cpu", "b.1.cpu", "b.2.cpu"]
    assert [r.id for r in a.page("", "cpu", ("cpu", "a", 10), 2)] == ["b.1.cpu", "b.2.cpu"]
    assert [r.id for r in a.page("b", "", None, 10)] == ["b.1.cpu", "b.2.cpu"]

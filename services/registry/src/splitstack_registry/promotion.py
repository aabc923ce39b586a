"""The promotion policy, evaluated: once a version is complete, decide whether it becomes production.

A version is complete when it is READY and has a serving choice for every required target of its
model. The decision is made inside the transaction that completes the version (the serving choice
that completes it; FinalizeVersion for a model without required targets), under the model row's
lock, so concurrent serving choices, alias moves and versions of one model are serialized. It is
made once: it is stored on the version (ModelVersion.promotion) and a decided version is never
decided again, whatever arrives later.

AUTO compares the version's metric (the policy's, else the model's primary metric; values come
from the version's lineage) with that of the version `production` points at now, the champion:
MAXIMIZE promotes when challenger >= champion + margin, MINIMIZE when challenger <= champion -
margin; no production yet promotes. A promotion moves `staging`, then `production`, through
aliases.set_alias: each move has its history row and its model.promoted event, like any SetAlias.
MANUAL (and an unspecified mode) only records the decision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from sqlalchemy import Row

from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import aliases, records
from splitstack_registry.store import Tx

log = logging.getLogger(__name__)

ACTOR = "registry/promotion-policy"
CHAMPION_ALIAS = "production"
PROMOTION_ALIASES = ("staging", CHAMPION_ALIAS)   # moved in this order
Outcome = pb.PromotionDecision


@dataclass(frozen=True)
class Contest:
    """What one decision compares: the challenger and the champion on one metric."""

    metric: str
    direction: int
    margin: float
    version: int
    value: float | None
    champion: int                  # 0: no production yet
    champion_value: float | None


def decide_if_complete(tx: Tx, model_row: Row, version: int) -> pb.PromotionDecision | None:
    """Decide (once) for a complete version, moving aliases when AUTO promotes it.

    Call with the model row locked. None when the version is not complete or was already decided.
    """
    row = tx.version_row(model_row.name, version)
    if row is None or row.promotion is not None or row.state != pb.READY:
        return None
    model = records.model_record(model_row)
    missing = sorted(set(model.required_targets) - tx.choice_targets(row.id))
    if missing:
        log.debug("model %s version %d waits for serving choices for %s", model.name, version, missing)
        return None
    decision = _decide(model.promotion_policy, _contest(tx, model, row))
    tx.set_promotion(row.id, records.to_bytes(decision))
    log.info("model %s version %d: %s", model.name, version, decision.reason)
    if decision.outcome == Outcome.PROMOTED:
        for alias in PROMOTION_ALIASES:
            aliases.set_alias(tx, pb.SetAliasRequest(model=model.name, alias=alias, version=version,
                                                     actor=ACTOR, reason=decision.reason))
    return decision


def _contest(tx: Tx, model: pb.Model, row: Row) -> Contest:
    policy = model.promotion_policy
    metric = policy.metric or model.primary_metric.name
    direction = policy.direction or model.primary_metric.direction
    champion, champion_value = 0, None
    alias = tx.alias_row(model.name, CHAMPION_ALIAS)
    if alias is not None:
        champion = alias.version
        champion_row = tx.version_row(model.name, champion)
        champion_value = metric_value(champion_row.lineage, metric) if champion_row is not None else None
    return Contest(metric, direction, policy.margin, row.version, metric_value(row.lineage, metric),
                   champion, champion_value)


def metric_value(stored_lineage: bytes | None, metric: str) -> float | None:
    """A version's finite value of `metric`: lineage.metrics, else its primary metric value; None if none."""
    lineage = records.from_bytes(pb.Lineage, stored_lineage)
    if not metric:
        return None
    if metric in lineage.metrics:
        value = lineage.metrics[metric]
    elif lineage.primary_metric.name == metric:
        value = lineage.primary_metric_value
    else:
        return None
    return value if math.isfinite(value) else None


def _decide(policy: pb.PromotionPolicy, contest: Contest) -> pb.PromotionDecision:
    if policy.mode != pb.PromotionPolicy.AUTO:
        outcome, reason = Outcome.RECORDED, _manual_reason(contest)
    else:
        outcome, reason = _auto_outcome(contest)
    decision = pb.PromotionDecision(outcome=outcome, reason=reason, champion_version=contest.champion,
                                    metric=contest.metric, challenger_value=contest.value or 0.0,
                                    champion_value=contest.champion_value or 0.0)
    decision.at.FromDatetime(records.utcnow())
    return decision


def _manual_reason(contest: Contest) -> str:
    reason = "manual: recorded only; people move aliases (SetAlias)"
    if contest.value is None:
        return reason
    compared = f"{contest.metric} {_num(contest.value)}"
    if contest.champion and contest.champion_value is not None:
        compared += f", production v{contest.champion} {_num(contest.champion_value)}"
    return f"{reason}; {compared}"


def _auto_outcome(c: Contest) -> tuple[int, str]:
    """PROMOTED or REJECTED, and the reason with the numbers compared."""
    if c.value is None:
        return Outcome.REJECTED, f"auto: v{c.version} has no {c.metric!r} metric in its lineage; not promoted"
    if not c.champion:
        return Outcome.PROMOTED, f"auto: {c.metric} {_num(c.value)} and no production version yet"
    if c.champion == c.version:
        return Outcome.PROMOTED, f"auto: v{c.version} is already production ({c.metric} {_num(c.value)})"
    if c.champion_value is None:
        return Outcome.REJECTED, (f"auto: production v{c.champion} has no {c.metric!r} metric to compare "
                                  f"{_num(c.value)} with; not promoted")
    return _compared(c, c.value, c.champion_value)


def _compared(c: Contest, value: float, champion: float) -> tuple[int, str]:
    minimize = c.direction == common_pb2.MINIMIZE
    needed = champion - c.margin if minimize else champion + c.margin
    wins = value <= needed if minimize else value >= needed
    better, worse, sign = ("<=", ">", "-") if minimize else (">=", "<", "+")
    production = f"production v{c.champion} {_num(champion)}"
    if wins:
        return Outcome.PROMOTED, f"auto: {c.metric} {_num(value)} {better} {production} (margin {_num(c.margin)})"
    return Outcome.REJECTED, (f"auto: {c.metric} {_num(value)} {worse} {_num(needed)} needed ({production} "
                              f"{sign} margin {_num(c.margin)}); not promoted")


def _num(value: float) -> str:
    return f"{value:.6g}"

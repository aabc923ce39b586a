"""Aliases: movable names for READY versions, every move kept forever and announced once.

An alias moves inside one transaction that holds the model row's lock: the alias row, its
history row (AliasMove) and the model.promoted event commit together, so two replicas moving the
same alias are serialized and every move appears exactly once in the history and on the bus.
Pointing an alias at the version it already names is no move: nothing is written or announced.
"""

from __future__ import annotations

from collections.abc import Iterable

from splitstack.chassis.errors import FailedPrecondition, NotFound
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack_registry import events, records
from splitstack_registry.lookups import require_alias, require_model, require_version
from splitstack_registry.store import Tx
from splitstack_registry.validation import check_alias_move, check_version


def check_set(request: pb.SetAliasRequest) -> None:
    """Stateless checks of a SetAlias request (names, version, bounded actor and reason)."""
    check_alias_move(request)
    check_version("version", request.version)


def check_delete(request: pb.DeleteAliasRequest) -> None:
    """Stateless checks of a DeleteAlias request (names, bounded actor and reason)."""
    check_alias_move(request)


def set_alias(tx: Tx, request: pb.SetAliasRequest) -> pb.Alias:
    """Point the alias at a READY version, recording the move and announcing it."""
    model = require_model(tx, request.model, lock=True)
    target = require_version(tx, request.model, request.version)
    if target.state != pb.READY:
        raise FailedPrecondition(f"model {request.model!r} version {request.version} is PENDING: aliases point "
                                 "at READY (finalized) versions only")
    current = tx.alias_row(request.model, request.alias)
    if current is not None and current.version == request.version:
        return records.alias_record(current)
    tx.put_alias(request.model, request.alias, request.version, request.actor, request.reason,
                 exists=current is not None)
    _move(tx, model.uid, request.model, request.alias, current.version if current is not None else 0,
          request.version, request.actor, request.reason, tx.serving_choices(target))
    return records.alias_record(require_alias(tx, request.model, request.alias))


def delete_alias(tx: Tx, request: pb.DeleteAliasRequest) -> pb.AliasMove:
    """Remove the alias, recording the move to version 0 and announcing it."""
    model = require_model(tx, request.model, lock=True)
    current = require_alias(tx, request.model, request.alias)
    tx.delete_alias(request.model, request.alias)
    return _move(tx, model.uid, request.model, request.alias, current.version, 0, request.actor, request.reason, [])


def _move(tx: Tx, uid: str, model: str, alias: str, from_version: int, to_version: int, actor: str,
          reason: str, choices: Iterable[pb.ServingChoice]) -> pb.AliasMove:
    row = tx.insert_move(model=model, alias=alias, from_version=from_version, to_version=to_version,
                         actor=actor, reason=reason)
    move = records.move_record(row)
    events.model_promoted(tx, uid, move, row.id, choices)
    return move


def resolve_alias(tx: Tx, model: str, alias: str) -> tuple[pb.Alias, pb.ModelVersion]:
    """The alias and the full version it points at."""
    row = require_alias(tx, model, alias)
    return records.alias_record(row), tx.version_record(require_version(tx, model, row.version))


def list_aliases(tx: Tx, model: str) -> list[pb.Alias]:
    """Every alias of the model, by name."""
    require_model(tx, model)
    return [records.alias_record(r) for r in tx.alias_rows(model)]


def alias_history(tx: Tx, model: str, alias: str) -> list[pb.AliasMove]:
    """Every move of the alias (or of every alias of the model when `alias` is empty), oldest first."""
    require_model(tx, model)
    moves = [records.move_record(r) for r in tx.move_rows(model, alias)]
    if alias and not moves:
        raise NotFound(f"model {model!r} never had an alias {alias!r}")
    return moves

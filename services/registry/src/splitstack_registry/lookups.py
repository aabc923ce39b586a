"""Reads that must find something: each raises NotFound naming exactly what is missing."""

from __future__ import annotations

from sqlalchemy import Row

from splitstack.chassis.errors import NotFound
from splitstack_registry.store import Tx


def require_model(tx: Tx, name: str, *, lock: bool = False) -> Row:
    """The model's row (locked for the transaction when `lock`)."""
    row = tx.model_row(name, lock=lock)
    if row is None:
        raise NotFound(f"model {name!r} not found")
    return row


def require_version(tx: Tx, model: str, version: int, *, lock: bool = False) -> Row:
    """The version's row; NotFound names the model when it is the model that is missing."""
    row = tx.version_row(model, version, lock=lock)
    if row is None:
        require_model(tx, model)
        raise NotFound(f"model {model!r} has no version {version}")
    return row


def require_dataset(tx: Tx, name: str, *, lock: bool = False) -> Row:
    """The dataset's row (locked for the transaction when `lock`)."""
    row = tx.dataset_row(name, lock=lock)
    if row is None:
        raise NotFound(f"dataset {name!r} not found")
    return row


def require_dataset_version(tx: Tx, dataset: str, version: int, *, field: str = "") -> Row:
    """Version `version` of the dataset (0: its latest); `field` prefixes the message when given."""
    row = tx.dataset_version_row(dataset, version)
    if row is not None:
        return row
    prefix = f"{field}: " if field else ""
    if tx.dataset_row(dataset) is None:
        raise NotFound(f"{prefix}dataset {dataset!r} not found")
    if version == 0:
        raise NotFound(f"{prefix}dataset {dataset!r} has no versions yet")
    raise NotFound(f"{prefix}dataset {dataset!r} has no version {version}")


def require_alias(tx: Tx, model: str, alias: str) -> Row:
    """The alias's row; NotFound names the model when it is the model that is missing."""
    row = tx.alias_row(model, alias)
    if row is None:
        require_model(tx, model)
        raise NotFound(f"model {model!r} has no alias {alias!r}")
    return row

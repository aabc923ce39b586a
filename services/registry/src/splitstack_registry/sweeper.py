"""The orphan sweeper: deletes blobs that no artifact or dataset version references.

A blob is published before the row that references it is written, so a process killed in between,
or a transaction that then fails (a lost race on an artifact key, a version finalized meanwhile, a
database outage), leaves a stored blob that nothing references and no API returns. The sweeper runs
at start and every `interval_seconds` in each replica:

1. it lists the blobs written more than `grace_seconds` ago (a fresh blob may belong to an upload
   whose row is about to be written);
2. for a page of them it opens a write transaction, takes each blob's lock (`Tx.lock_blob`, the
   lock under which an upload writes its row and checks that its blob is still stored), asks which
   are referenced, and deletes the others before it commits;
3. on S3 it aborts multipart uploads older than the grace period (left by a killed process).

Spool files of interrupted uploads are the spool's business (spool.py, at every store's start).
A failed sweep is logged and retried at the next interval; it never stops the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial

from prometheus_client import Counter

from splitstack_registry.blobs import BlobStore
from splitstack_registry.store import Store, Tx

log = logging.getLogger(__name__)

PAGE = 100
ORPHANS_REMOVED = Counter("splitstack_registry_orphan_blobs_removed",
                          "Unreferenced blobs (and abandoned S3 multipart uploads) the orphan sweeper removed",
                          ["what"])


@dataclass(frozen=True)
class SweepResult:
    """What one sweep looked at and removed."""

    examined: int
    removed: int
    abandoned_parts: int


class OrphanSweeper:
    """Removes unreferenced blobs older than a grace period, at start and periodically."""

    def __init__(self, store: Store, blobs: BlobStore, *, grace_seconds: float, interval_seconds: float) -> None:
        self.store = store
        self.blobs = blobs
        self.grace_seconds = grace_seconds
        self.interval_seconds = interval_seconds

    def sweep(self) -> SweepResult:
        """One sweep (blocking: database and blob store calls)."""
        cutoff = time.time() - self.grace_seconds
        examined = removed = 0
        for listed in self.blobs.stored_before(cutoff):
            for start in range(0, len(listed), PAGE):
                page = sorted(listed[start:start + PAGE])
                examined += len(page)
                removed += self.store.write(partial(self._remove_unreferenced, digests=page))
        parts = self.blobs.abandoned_parts_before(cutoff)
        ORPHANS_REMOVED.labels("blob").inc(removed)
        ORPHANS_REMOVED.labels("multipart_upload").inc(parts)
        return SweepResult(examined, removed, parts)

    def _remove_unreferenced(self, tx: Tx, digests: list[str]) -> int:
        for sha256 in digests:                        # sorted: two sweepers lock in the same order
            tx.lock_blob(sha256)
        orphans = [d for d in digests if d not in tx.referenced_blobs(digests)]
        for sha256 in orphans:
            self.blobs.delete_sync(sha256)
            log.info("removed unreferenced blob sha256:%s (orphan of a failed or interrupted upload)", sha256)
        return len(orphans)

    async def run_until_cancelled(self) -> None:
        """Sweep now, then every `interval_seconds`, until cancelled."""
        while True:
            try:
                result = await asyncio.to_thread(self.sweep)
            except Exception:  # a failed sweep must never stop the registry
                log.warning("orphan sweep failed; retrying in %.0f s", self.interval_seconds, exc_info=True)
            else:
                log.log(logging.INFO if result.removed or result.abandoned_parts else logging.DEBUG,
                        "orphan sweep: %d old blob(s) examined, %d removed, %d abandoned multipart upload(s) "
                        "aborted", result.examined, result.removed, result.abandoned_parts)
            await asyncio.sleep(self.interval_seconds)

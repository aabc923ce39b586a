"""The spool: private files where uploads land while they are counted, hashed and checked.

Each blob store owns a spool sub-directory for its life through an flock that the kernel drops
when the process dies (even on SIGKILL), so a store opening later removes every spool directory
whose lock it can take, and never one of a live replica.

Space is checked before and while writing: an upload first reserves its declared size, and is
refused (RESOURCE_EXHAUSTED, naming the spool and the knob) unless the filesystem keeps at least
`min_free_bytes` free after every reservation of this process is written; every chunk written
checks again that `min_free_bytes` are still free (other processes share the disk).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from splitstack.chassis.errors import ResourceExhausted

log = logging.getLogger(__name__)

MIN_FREE_KNOB = "SPLITSTACK_REGISTRY_SPOOL_MIN_FREE_BYTES"


class SpoolReservation:
    """The room one upload was promised in the spool; shrinks as its bytes are written."""

    def __init__(self, spool: SpoolDir, size: int) -> None:
        self._spool = spool
        self.outstanding = size

    def written(self, count: int) -> None:
        """`count` more bytes were written: they now occupy the disk instead of the reservation."""
        self._spool._release(min(count, self.outstanding))
        self.outstanding = max(0, self.outstanding - count)
        self._spool.check_free()

    def release(self) -> None:
        """The upload ended: give back what it did not write."""
        self._spool._release(self.outstanding)
        self.outstanding = 0


class SpoolDir:
    """This store's private directory for in-flight uploads, held by an flock on `<id>.lock`."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._reserved = 0
        self._guard = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        sweep_stale_spools(root)
        self._lock_file, self.path = _claim_spool(root)

    def new_file(self, sha256: str) -> tuple[Path, BinaryIO]:
        """A fresh, empty spool file for an upload of `sha256`, open for writing."""
        fd, name = tempfile.mkstemp(prefix=f"{sha256[:16]}.", suffix=".part", dir=self.path)
        return Path(name), os.fdopen(fd, "wb")

    def free_bytes(self) -> int:
        """Bytes free on the spool's filesystem now."""
        return shutil.disk_usage(self.path).free

    def reserve(self, size: int) -> SpoolReservation:
        """Promise `size` bytes to an upload, or ResourceExhausted when the spool cannot hold them."""
        with self._guard:
            free = self.free_bytes()
            if free - self._reserved - size < self.min_free_bytes:
                raise ResourceExhausted(
                    f"spool: an upload of {size} bytes does not fit in {self.path}: {free} bytes free, "
                    f"{self._reserved} promised to uploads in flight, {self.min_free_bytes} must stay free "
                    f"({MIN_FREE_KNOB}); retry later")
            self._reserved += size
        return SpoolReservation(self, size)

    def check_free(self) -> None:
        """ResourceExhausted when less than `min_free_bytes` are free (someone else filled the disk)."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise ResourceExhausted(f"spool: only {free} bytes are free in {self.path}; {self.min_free_bytes} must "
                                    f"stay free ({MIN_FREE_KNOB}); the upload was stopped, retry later")

    def _release(self, size: int) -> None:
        with self._guard:
            self._reserved = max(0, self._reserved - size)

    def close(self) -> None:
        """Remove this store's spool directory and release its lock."""
        if self._lock_file.closed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        Path(self._lock_file.name).unlink(missing_ok=True)
        self._lock_file.close()


def _claim_spool(root: Path) -> tuple[BinaryIO, Path]:
    """Create and lock `<root>/<id>.lock`, then make `<root>/<id>/`; retry if a sweeper got there first."""
    while True:
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        lock_path = root / f"{name}.lock"
        lock_file = open(lock_path, "xb")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            continue
        if _same_file(lock_file, lock_path):
            (root / name).mkdir()
            return lock_file, root / name
        lock_file.close()


def _same_file(opened: BinaryIO, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(opened.fileno()).st_ino
    except FileNotFoundError:
        return False


def sweep_stale_spools(root: Path) -> int:
    """Remove the spool directories of stores that died (their lock is free); return files removed."""
    removed = 0
    for lock_path in sorted(root.glob("*.lock")):
        try:
            lock_file = open(lock_path, "rb")
        except FileNotFoundError:
            continue
        with lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            stale = root / lock_path.stem
            removed += sum(1 for p in stale.rglob("*") if p.is_file()) if stale.is_dir() else 0
            shutil.rmtree(stale, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d stale spool file(s) of interrupted uploads under %s", removed, root)
    return removed

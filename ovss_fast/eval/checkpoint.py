"""What an evaluation keeps when it is interrupted or meets bad data (docs/evaluation-protocols.md,
"What an evaluation guarantees").

- :func:`check_writable` proves, before any work, that the results file can be written
  (its folder exists or can be made, is a folder, and accepts a file);
- :func:`write_json_atomic` writes a temporary file next to the target and renames it
  over the target (``os.replace``), so a results file or checkpoint is either the old
  one or the complete new one, never half written;
- :class:`RunState` holds the running confusion matrix, the processed item indices and
  the bad items of this rank, writes them to a checkpoint every ``every`` images, on
  SIGINT / SIGTERM (at the next image boundary) and when the loop fails, and reads them
  back for ``--resume``.

Distributed runs: each rank checkpoints its own shard (``PATH.rank{r}-of-{world}``) with
its own confusion matrix, before any reduction; ``--resume`` therefore needs the same
world size (the shards are the same), which is checked. Confusion matrices are int64 counts,
so a resumed run sums to exactly the uninterrupted numbers.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ovss_fast.errors import InputError

FORMAT = 1


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the loop at an image boundary; the checkpoint (if any) is written."""


class BadItem(ValueError):
    """An image or annotation could not be read; the message names the file and what is wrong."""


def check_writable(path: str, what: str = "--out") -> None:
    """Fail now, before the evaluation, if ``path`` cannot be written (making its folder if needed)."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise InputError(f"{what} {path!r} is a folder; give a file name such as results.json")
    parent = os.path.dirname(target)
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{what} {path!r} cannot be written: {probe!r} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ovss_fast-probe-", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"{what} {path!r} cannot be written ({exc.strerror or exc})") from exc


def write_json_atomic(path: str, obj: Any, *, indent: int | None = 1) -> None:
    """JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rank_path(path: str, rank: int, world_size: int) -> str:
    """This rank's checkpoint file: ``path`` itself in one process, ``path.rank{r}-of-{world}`` otherwise."""
    return path if world_size <= 1 else f"{path}.rank{rank}-of-{world_size}"


class RunState:
    """This rank's progress: confusion matrix, processed indices, bad items; checkpoints and resume.

    path: the checkpoint file (None: keep nothing on disk); every: write it every this many
    images (0: only on interruption or failure); fingerprint: what must not change between a
    run and its resumption (dataset, model, mode, limit, ...); resume: start from the
    checkpoint when there is one; skip_bad: record unreadable items and go on instead of failing.
    """

    def __init__(self, num_classes: int, *, path: str | None = None, every: int = 0,
                 fingerprint: dict | None = None, resume: bool = False, skip_bad: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        if every < 0:
            raise InputError(f"checkpoint interval must be >= 0, got {every}")
        self.num_classes, self.every, self.skip_bad = int(num_classes), int(every), bool(skip_bad)
        self.rank, self.world_size = int(rank), int(world_size)
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))  # as it will read back
        self.path = None if path is None else rank_path(path, self.rank, self.world_size)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        #: Boundary IoU's per-class [intersection, union] sums ([2, K] float64 on the CPU, updated in place by
        #: run_loop); NaN after resuming a checkpoint written without them (the report then leaves BIoU out)
        self.boundary = torch.zeros(2, self.num_classes, dtype=torch.float64)
        self.done: list[int] = []
        self.bad: list[dict] = []
        self.seconds = 0.0  # loop time of earlier (interrupted) runs
        self.resumed = 0  # images done before this run
        self.stop_signal: int | None = None
        self._since = 0
        self._t0: float | None = None
        if resume:
            self._load()

    # ------------------------------------------------------------------ resume
    def _load(self) -> None:
        if self.path is None:
            raise InputError("--resume needs a checkpoint: pass --out (checkpoint OUT.ckpt) or --checkpoint PATH")
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path) as f:
                data = json.load(f)
            cm = torch.tensor(data["confusion"], dtype=torch.int64)
            done = [int(i) for i in data["done"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"checkpoint {self.path!r} is unreadable ({exc.__class__.__name__}: {exc}); "
                             "delete it to start again") from exc
        if data.get("format") != FORMAT or data.get("world_size") != self.world_size:
            raise InputError(f"checkpoint {self.path!r} was written by a run with world size "
                             f"{data.get('world_size')} (format {data.get('format')}); resume with the same "
                             f"number of processes ({self.world_size} now) or delete it")
        if data.get("fingerprint") != self.fingerprint:
            old, new = data.get("fingerprint") or {}, self.fingerprint
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise InputError(f"checkpoint {self.path!r} belongs to a different evaluation (differs in: "
                             f"{', '.join(keys)}); rerun with the same settings or delete it")
        if tuple(cm.shape) != (self.num_classes, self.num_classes):
            raise InputError(f"checkpoint {self.path!r} has a {tuple(cm.shape)} confusion matrix, expected "
                             f"{self.num_classes} classes")
        self.confusion, self.done = cm, done
        try:
            self.boundary = torch.tensor(data["boundary"], dtype=torch.float64).reshape(2, self.num_classes)
        except (KeyError, ValueError, TypeError, RuntimeError):
            self.boundary.fill_(float("nan"))
        self.bad = list(data.get("bad", []))
        self.seconds = float(data.get("seconds", 0.0))
        self.resumed = len(done)

    def todo(self, indices: list[int]) -> list[int]:
        """The indices of this rank's shard not processed yet (bad items skipped before count as processed)."""
        seen = set(self.done) | {b["index"] for b in self.bad}
        return [i for i in indices if i not in seen]

    # ------------------------------------------------------------------ progress
    def item_done(self, index: int, confusion: Tensor) -> None:
        """After an image: note it, checkpoint when due, stop if a signal arrived."""
        self.done.append(int(index))
        self._since += 1
        if self.every and self._since >= self.every:
            self.save(confusion)
        self._check_stop(confusion)

    def item_bad(self, index: int, message: str, confusion: Tensor) -> None:
        """An unreadable item: fail with its one-line message, or (skip_bad) record it and go on."""
        if not self.skip_bad:
            raise BadItem(message)
        self.bad.append({"index": int(index), "error": message})
        self._check_stop(confusion)

    def _check_stop(self, confusion: Tensor) -> None:
        if self.stop_signal is not None:
            self.save(confusion)
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        """The error for a stop by signal (also when the signal killed DataLoader workers first)."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a signal"
        where = f"; checkpoint {self.path!r}, rerun with --resume to continue" if self.path else \
            " (no checkpoint: pass --out or --checkpoint to keep progress)"
        return Interrupted(f"{name} after {len(self.done)} images of this process{where}")

    def save(self, confusion: Tensor) -> None:
        """Write the checkpoint now (atomically); a no-op without a path."""
        self._since = 0
        if self.path is None:
            return
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        data = {"format": FORMAT, "world_size": self.world_size, "rank": self.rank,
                "fingerprint": self.fingerprint, "confusion": confusion.cpu().tolist(),
                "boundary": self.boundary.tolist(), "done": self.done,
                "bad": self.bad, "seconds": round(self.seconds + elapsed, 3)}
        write_json_atomic(self.path, data, indent=None)

    def remove(self) -> None:
        """After the results are written: the checkpoint is no longer needed."""
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)

    # ------------------------------------------------------------------ signals
    @contextmanager
    def guard(self, confusion: Tensor) -> Iterator[None]:
        """SIGINT / SIGTERM stop the loop at the next image boundary (a second one stops it at once);
        any failure inside writes the checkpoint of what was completed before it propagates."""
        previous = {}

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:  # second signal: give up waiting for the image
                raise KeyboardInterrupt
            self.stop_signal = signum

        self._t0 = time.perf_counter()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        except BaseException:
            try:
                self.save(confusion)
            except OSError:
                pass
            raise
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class Guarded(torch.utils.data.Dataset):
    """A dataset whose unreadable items come back as {"error": message} instead of raising
    (in a DataLoader worker, a raised error would arrive as a remote traceback)."""

    ERRORS = (ValueError, OSError)

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except self.ERRORS as exc:
            return {"error": str(exc) or exc.__class__.__name__}


__all__ = ["BadItem", "Guarded", "Interrupted", "RunState", "check_writable", "rank_path", "write_json_atomic"]

"""The job's MLflow journal: everything a job logs, written beside its outputs before it is sent to the store.

Results on disk are the truth and MLflow is a view of them: a tracked job appends one JSON line per call
(`start`, `params`, `metrics`, `tags`, `dataset`, `artifact`, `end`) to `<out>/mlflow-journal.jsonl`, then
sends the call. A store that is unreachable past the retry budget loses nothing: the lines are there, and
`nern.tracking.replay_journal` (called when the job ends, and by `nern track sync`) makes the store hold them,
idempotently. One file holds one job (its output directory and config digest); a job rerun with another config
starts the file afresh. The journal never holds credentials or store-specific ids (run ids, the parent's id):
replayed into any store, it finds or creates the job's run there.

Only file I/O lives here, so the module imports without MLflow.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOURNAL_NAME = "mlflow-journal.jsonl"
VERSION = 1


def now_ms() -> int:
    return int(time.time() * 1000)


class Journal:
    """An append-only JSON-lines file; one writer (the job), any number of readers (sync)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, op: str, **fields: Any) -> None:
        """One record, written with a single write() so a reader never sees half a line from a live writer."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"op": op, **fields}, sort_keys=True, allow_nan=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record; a torn last line (the writer was killed mid-write) is left out."""
        if not self.path.is_file():
            return []
        found = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "op" in record:
                found.append(record)
        return found

    def begin(self, identity: dict[str, Any]) -> bool:
        """Start (or continue) the job's journal: the same job (output and config digest) appends to it, a job
        with another config, or a finished job without a digest, starts it afresh. True when it continues an
        earlier attempt's journal (whose records the store may lack)."""
        previous = self.records()
        starts = [r for r in previous if r["op"] == "start"]
        same = bool(starts) and all(starts[-1].get(k) == identity.get(k) for k in ("key", "digest", "experiment"))
        fresh = not same or (identity.get("digest") is None and previous[-1]["op"] == "end")
        if fresh:
            self.path.unlink(missing_ok=True)
        self.append("start", v=VERSION, ts=now_ms(), **identity)
        return not fresh


def find_journals(root: str | os.PathLike) -> list[Path]:
    """Every job journal below `root`, sorted (a stable order: reruns of sync do the same work)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(root.rglob(JOURNAL_NAME))


def iter_ops(records: list[dict[str, Any]], op: str) -> Iterator[dict[str, Any]]:
    return (r for r in records if r["op"] == op)

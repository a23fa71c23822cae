"""Artefacts on disk: safetensors with JSON metadata, JSON metrics, all written atomically.

Every writer goes through `atomic_path`: the bytes land in a temporary file in the same directory, are
fsync'ed, and only then renamed over the target. A crash therefore leaves either the old file or the new
one, never a half-written file that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nern.errors import NernError

METADATA_KEY = "nern"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise NernError(f"cannot write {target}: {exc.strerror}; choose a writable output directory") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; artefacts are ordinary files
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise NernError(f"no space left on device while writing {target}; free disk space and rerun") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | os.PathLike, names: list[str]) -> int:
    """Delete `.NAME.*.tmp` left by a writer that was SIGKILLed mid-write; call at the start of a stage that
    owns `directory` (one job per output directory, as every pipeline rule has)."""
    removed = 0
    for name in names:
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every reader (pandas, jq, browsers) can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise NernError(f"file not found: {path}; check the path or run the stage that produces it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NernError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); delete it and rerun") from exc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` as safetensors; `metadata` travels as one JSON string in the file header."""
    header = {METADATA_KEY: json.dumps(_finite(metadata), sort_keys=True, default=_json_default)}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by `save_tensors`; a missing or corrupt file is a user error, not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise NernError(f"file not found: {path}; check the path or run the stage that produces it")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NernError(f"{path} is not a readable safetensors file ({exc}); it may be truncated, rerun the stage") from exc
    metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    return tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return load_tensors(path)[1]

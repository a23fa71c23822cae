"""NNCodec (Fraunhofer HHI's ISO/IEC 15938-17 Neural Network Coding) as a codec for a set of float tensors.

It is the codec a user would pick to shrink a trained network (dependent quantisation plus deepCABAC entropy
coding, one quantisation parameter `qp` for the weights: lower is coarser), so `nern compress` measures the
ORIGINAL network through it under the same accounting as every other row: the whole bitstream's bytes on
disk, and the accuracy of a fresh network loaded from the bitstream read back. The same codec can carry a
predictor's tensors (`nern.compress`, representation "nern+nnc").

`nncodec` 2.1.3 is an sdist that builds a C++ extension and pins `numpy<2`; with numpy 2 it works (measured:
the public ResNet20 gives the bytes listed in ../shared/docs/INFRA.md), so setup.sh installs it with
`--no-deps` beside the runtime packages it imports (the `codec` extra of pyproject.toml).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from nern.artifacts import atomic_path
from nern.errors import NernError

NNC_SUFFIX = ".nnc"  # a bitstream `write_nnc` wrote
QPS = (-38, -32, -26, -20, -16, -12)  # the grid of ../shared/docs/INFRA.md: lossless-looking to -23 pt


def available() -> bool:
    try:
        import nncodec.nnc  # noqa: F401
    except ImportError:
        return False
    return True


def _nnc():  # noqa: ANN202 - the module's type comes from an optional package
    try:
        from nncodec import nnc
    except ImportError as exc:
        raise NernError("NNCodec is not installed; run `bash setup.sh` (it installs nncodec==2.1.3 with --no-deps) "
                        "or leave out --nncodec-qps") from exc
    return nnc


def float_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What NNCodec codes: the floating-point tensors (integer buffers such as BatchNorm's step count are not
    needed to run the network and are not part of any row's file)."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def write_nnc(path: str | Path, tensors: dict[str, torch.Tensor], qp: int) -> int:
    """Encode `tensors` at `qp` into the bitstream `path`; returns its size on disk."""
    nnc = _nnc()
    arrays = {k: v.detach().cpu().float().contiguous().numpy() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()):
        nnc.compress(arrays, bitstream_path=str(tmp), qp=int(qp))
    return path.stat().st_size


def read_nnc(path: str | Path) -> dict[str, torch.Tensor]:
    """The float32 tensors decoded from a bitstream written by `write_nnc`."""
    nnc = _nnc()
    if not Path(path).is_file():
        raise NernError(f"NNCodec bitstream not found: {path}; run `nern compress` to write it")
    with contextlib.redirect_stdout(io.StringIO()):
        decoded = nnc.decompress(str(path))
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in decoded.items()}

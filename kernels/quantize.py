"""Float vectors to the integer output types vector databases store: int8, uint8, binary, ubinary.

The rules are sentence-transformers' ``quantize_embeddings`` with fixed ranges, so that a vector's bytes never
depend on what else was in its batch:

- ``ubinary``: one bit per value (``v > 0``), most significant bit first, packed into ``width / 8`` bytes
  (``numpy.packbits``); ``binary``: the same bytes minus 128, as int8. The width must be a multiple of 8.
- ``uint8``: ``clip(round((v - lo) / ((hi - lo) / 255)), 0, 255)`` with ``lo``, ``hi`` per dimension (a
  ``[2, width]`` tensor: the calibration vectors' minimum and maximum, :func:`ranges_of`); a dimension whose
  range is empty takes a step of 1, as sentence-transformers does; ``int8``: uint8 minus 128. Values outside
  the range clip to the ends, never wrap. (sentence-transformers floors where this rounds: at most 1 apart.)

:func:`quantize` is the pure-torch form: the CPU path and the oracle for a fused device kernel.
"""

from __future__ import annotations

import torch

OUTPUT_TYPES = ("int8", "uint8", "binary", "ubinary")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def ranges_of(calibration: torch.Tensor) -> torch.Tensor:
    """``[n, width]`` calibration vectors -> ``[2, width]`` float32: each dimension's minimum, then maximum."""
    if calibration.ndim != 2 or calibration.shape[0] == 0:
        raise ValueError(f"calibration vectors must be a non-empty [n, width] matrix, got {tuple(calibration.shape)}")
    v = calibration.float()
    return torch.stack([v.amin(dim=0), v.amax(dim=0)])


def pack_bits(vectors: torch.Tensor) -> torch.Tensor:
    """``[n, width]`` -> ``[n, width / 8]`` uint8: bit 7 of byte j is ``vectors[:, 8j] > 0``, bit 0 is
    ``vectors[:, 8j + 7] > 0``."""
    n, width = vectors.shape
    if width % 8:
        raise ValueError(f"binary output needs a width that is a multiple of 8, got {width}")
    bits = (vectors > 0).to(torch.int32).reshape(n, width // 8, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=vectors.device)
    return (bits * weights).sum(dim=-1).to(torch.uint8)


def quantize(vectors: torch.Tensor, kind: str, ranges: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, width]`` float vectors as ``kind`` (one of :data:`OUTPUT_TYPES`): uint8 or int8 ``[n, width]`` for
    the scalar types (``ranges [2, width]`` required), ``[n, width / 8]`` for the binary ones."""
    if kind not in OUTPUT_TYPES:
        raise ValueError(f"unknown output type {kind!r}; supported: {', '.join(OUTPUT_TYPES)}")
    if kind in ("binary", "ubinary"):
        packed = pack_bits(vectors)
        return packed if kind == "ubinary" else (packed.to(torch.int16) - 128).to(torch.int8)
    if ranges is None or tuple(ranges.shape) != (2, vectors.shape[1]):
        got = None if ranges is None else tuple(ranges.shape)
        raise ValueError(f"{kind} output needs ranges of shape (2, {vectors.shape[1]}), got {got}")
    lo, hi = ranges[0].float(), ranges[1].float()
    step = (hi - lo) / 255
    step = torch.where(step == 0, torch.ones_like(step), step)
    levels = torch.clamp(torch.round((vectors.float() - lo) / step), 0, 255)
    if kind == "uint8":
        return levels.to(torch.uint8)
    return (levels.to(torch.int16) - 128).to(torch.int8)

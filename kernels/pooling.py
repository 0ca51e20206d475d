"""Segment pooling and the finishing step over packed hidden states: the pure-torch path.

``pool`` reduces each sequence of ``hidden [T, H]`` (delimited by ``cu_seqlens [B+1]``) to one fp32 row.
``finish`` applies per-row Matryoshka truncation and L2 normalisation. Accumulation is in fp32 whatever
the input dtype. A fused GPU kernel must match these exactly.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """``hidden [T, H]`` -> ``[B, H]`` float32."""
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    if mode == "cls":
        return hidden.index_select(0, starts).float()
    if mode == "last":
        return hidden.index_select(0, ends - 1).float()
    if mode == "mean":
        lengths = ends - starts  # [B]
        B = lengths.shape[0]
        # output_size: the total is known, so the device is not asked for it (no host sync on CUDA).
        seg = torch.repeat_interleave(torch.arange(B, device=hidden.device), lengths, output_size=hidden.shape[0])
        sums = torch.zeros(B, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, seg, hidden.float())
        # An empty segment cannot occur (every input has at least its special tokens); clamp anyway
        # so a bug shows as a zero vector rather than NaN.
        return sums / lengths.clamp(min=1).unsqueeze(1).float()
    raise ValueError(f"unknown pooling mode {mode!r}; supported: {', '.join(POOLING_MODES)}")


def finish(vectors: torch.Tensor, dims: torch.Tensor, normalize: torch.Tensor) -> torch.Tensor:
    """Per row i: keep the first ``dims[i]`` values, L2-normalise them when ``normalize[i]``.

    ``vectors [B, D]`` float32, ``dims [B]`` int, ``normalize [B]`` bool. Returns ``[B, D]`` float32 whose row i
    is meaningful up to ``dims[i]`` (zero beyond).
    """
    B, D = vectors.shape
    keep = torch.arange(D, device=vectors.device).unsqueeze(0) < dims.unsqueeze(1)  # [B, D]
    out = vectors.float() * keep
    norms = out.norm(dim=1, keepdim=True).clamp(min=1e-12)  # sentence-transformers' eps
    return torch.where(normalize.unsqueeze(1), out / norms, out)

"""SPLADE pooling over packed tokens: a masked-LM head's logits per token -> one vocabulary-wide weight vector per
sequence, as sentence-transformers' ``SpladePooling`` computes it on a padded batch:

    weight[b, v] = pool over the tokens t of sequence b of  log1p(relu(logits[t, v]))

with ``pool`` the maximum (SPLADE v2 and later) or the sum (the original SPLADE), and the activation
``log1p_relu`` applying log1p once more (OpenSearch's models). Every activated value is >= 0, so a sequence's
maximum starts from 0 and an absent token contributes nothing either way.

The logits of a whole step ([T, V] with V about 30,000) would be hundreds of MB, so they are made and pooled a
block of tokens at a time: :func:`splade_pool` takes the hidden states and the head and keeps only
``[block, V]`` logits at once. Each block's pooling is one call of ``pool_block`` (:data:`IMPLS`): the pure-torch
twin (the CPU path and the oracle; for max pooling it reduces each sequence's raw logits first and activates only
the maxima, the activation being non-decreasing) or a Triton kernel (one program per sequence and vocabulary tile,
reading each logit once; the CUDA path, checked on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

MODES = {"max": 0, "sum": 1}
ACTIVATIONS = {"relu": 0, "log1p_relu": 1}

try:  # triton ships with CUDA builds of torch; a CPU install need not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def _check(mode: str, activation: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown SPLADE pooling {mode!r}; supported: {', '.join(MODES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown SPLADE activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")


def _activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    x = torch.log1p(torch.relu(x.float()))
    return torch.log1p(x) if activation == "log1p_relu" else x


def _max_block(logits: torch.Tensor, cu_seqlens: torch.Tensor, start: int, out: torch.Tensor, activation: str
               ) -> None:
    """Max pooling: the activation never decreases, so a sequence's largest weight is the activation of its
    largest logit; each sequence's logits are reduced first (one pass) and only ``[B, V]`` values activated. The
    block's one-token sequences go together."""
    n = logits.shape[0]
    cu = cu_seqlens.tolist()
    singles, single_rows = [], []
    for b in range(bisect.bisect_right(cu, start) - 1, len(cu) - 1):
        lo, hi = max(cu[b], start), min(cu[b + 1], start + n)
        if lo >= start + n:
            break
        if hi - lo == 1:
            singles.append(b)
            single_rows.append(lo - start)
        elif hi > lo:
            torch.maximum(out[b], _activate(logits[lo - start : hi - start].amax(0), activation), out=out[b])
    if singles:
        index = torch.tensor(singles, device=out.device)
        rows = _activate(logits[torch.tensor(single_rows, device=logits.device)], activation)
        out.index_copy_(0, index, torch.maximum(out.index_select(0, index), rows))


def pool_block_torch(logits: torch.Tensor, cu_seqlens: torch.Tensor, start: int, out: torch.Tensor, mode: str,
                     activation: str) -> None:
    """Pool the block of tokens ``[start, start + len(logits))`` of the packed step into ``out [B, V]`` float32
    (combined with what earlier blocks left there). ``cu_seqlens [B+1]``: the step's sequence offsets."""
    _check(mode, activation)
    if mode == "max":
        _max_block(logits, cu_seqlens, start, out, activation)
        return
    x = _activate(logits, activation)
    n = x.shape[0]
    positions = torch.arange(start, start + n, device=x.device)
    seg = torch.searchsorted(cu_seqlens.to(x.device).long(), positions, right=True) - 1  # each token's sequence
    out.index_add_(0, seg, x)


if triton is not None:

    @triton.jit
    def _pool_block_kernel(logits_ptr, stride_t, cu_ptr, out_ptr, start, n, V,
                           MODE: tl.constexpr, ACT: tl.constexpr, BLOCK_V: tl.constexpr):
        b = tl.program_id(0)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        live = offs_v < V
        lo = tl.maximum(tl.load(cu_ptr + b), start)
        hi = tl.minimum(tl.load(cu_ptr + b + 1), start + n)
        if lo < hi:
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for t in range(lo, hi):
                x = tl.load(logits_ptr + (t - start).to(tl.int64) * stride_t + offs_v, mask=live, other=0.0)
                x = tl.log(1.0 + tl.maximum(x.to(tl.float32), 0.0))
                if ACT == 1:
                    x = tl.log(1.0 + x)
                if MODE == 0:
                    acc = tl.maximum(acc, x)
                else:
                    acc += x
            row = out_ptr + b.to(tl.int64) * V + offs_v
            before = tl.load(row, mask=live, other=0.0)
            tl.store(row, tl.maximum(before, acc) if MODE == 0 else before + acc, mask=live)


def pool_block_triton(logits: torch.Tensor, cu_seqlens: torch.Tensor, start: int, out: torch.Tensor, mode: str,
                      activation: str) -> None:
    if triton is None:
        raise RuntimeError("this is a bug: the triton SPLADE pooling was chosen but triton is not installed")
    _check(mode, activation)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, V = out.shape
    block_v = 1024
    _pool_block_kernel[(B, triton.cdiv(V, block_v))](
        logits, logits.stride(0), cu_seqlens.to(device=logits.device, dtype=torch.int32), out, start,
        logits.shape[0], V, MODE=MODES[mode], ACT=ACTIVATIONS[activation], BLOCK_V=block_v,
    )


IMPLS = {"torch": pool_block_torch, "triton": pool_block_triton}


def splade_pool(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], cu_seqlens: torch.Tensor,
                vocab: int, mode: str, activation: str = "relu", *, block: int = 256,
                impl: str = "torch") -> torch.Tensor:
    """``hidden [T, H]`` packed final states -> ``[B, V]`` float32 SPLADE weights; ``head`` maps ``[n, H]`` states to
    ``[n, V]`` logits and is called on ``block`` tokens at a time."""
    B = cu_seqlens.shape[0] - 1
    out = torch.zeros(B, vocab, dtype=torch.float32, device=hidden.device)
    pool_block = IMPLS[impl]
    for start in range(0, hidden.shape[0], block):
        pool_block(head(hidden[start : start + block]), cu_seqlens, start, out, mode, activation)
    return out

"""Varlen attention over packed tokens, behind one function.

Sequences are concatenated along the token axis: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` and
``cu_seqlens [B+1]`` (int32 offsets). A token attends only to tokens of its own sequence.

Backends, chosen once at start-up by :func:`select_backend` and logged:

- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA only).
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when that package is installed (CUDA only).
- ``sdpa_bucketed``: sequences sorted by length and grouped so that padding stays small; each group is
  gathered into a padded ``[G, H, L, D]`` block for one SDPA call and scattered back. Padding lives
  inside attention only: every other layer runs on the packed tokens. The CPU default (measured by
  ``benchmarks/bench_attention.py``).
- ``sdpa_segments``: one SDPA call per sequence.
- ``dense``: one ``[T, T]`` block-diagonal masked SDPA call. The reference the others are tested against.

Callers build an :class:`AttentionBatch` once per forward pass (it holds the host-side bookkeeping)
and pass it to :func:`varlen_attention` in every layer.

Masking: ``causal`` keeps a token off later tokens; ``window`` (transformers' ``sliding_window``) keeps it
off tokens ``window`` or more positions away (only earlier ones matter when causal). Query and key tokens of
different sequences never see each other. GQA (fewer key/value heads than query heads) works everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("torch_varlen", "flash_attn", "sdpa_bucketed", "sdpa_segments", "dense")

# Bucketing: a group's padded area (count * longest^2) may exceed its real area by this factor.
_BUCKET_WASTE = 1.3
# Sequences at least this long run as their own SDPA call on a strided view (no gather, no padding);
# shorter ones are bucketed, where one call for many sequences beats a call each.
# benchmarks/bench_kernels.py measured the crossover on the development CPU.
SOLO_MIN_LENGTH = 64


@dataclass
class _Bucket:
    gather: torch.Tensor  # [G * L] token index per padded slot (padding repeats a real token, masked off)
    key_mask: torch.Tensor | None  # [G, 1, 1, L] bool, None when no row is padded
    slot_group: torch.Tensor  # [n] group of each real token, in token order within the bucket
    slot_pos: torch.Tensor  # [n] position of each real token within its group
    scatter: torch.Tensor  # [n] packed token index of each real token
    groups: int
    length: int


@dataclass
class AttentionBatch:
    """Per-forward-pass metadata shared by every layer."""

    backend: str
    cu_seqlens: torch.Tensor  # [B+1] int32 on the compute device
    max_seqlen: int
    lengths: list[int]
    causal: bool = False
    window: int | None = None
    buckets: list[_Bucket] = field(default_factory=list)
    solo: list[tuple[int, int]] = field(default_factory=list)  # (start, length) run one by one


def _available_backends(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    found = []
    # The flash kernels take fp16/bf16 only: fp32 on CUDA runs SDPA.
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            found.append("torch_varlen")
        except ImportError:
            pass
        if importlib.util.find_spec("flash_attn") is not None:
            found.append("flash_attn")
    found += ["sdpa_bucketed", "sdpa_segments", "dense"]
    return found


def select_backend(device: torch.device, requested: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """Pick the backend once for the process; an unavailable explicit choice is an error, not a downgrade."""
    available = _available_backends(device, dtype)
    if requested in ("auto", None):
        choice = available[0]
    elif requested == "sdpa":
        choice = "sdpa_bucketed"
    elif requested in available:
        choice = requested
    else:
        raise ValueError(
            f"attention backend {requested!r} is not available on {device.type} with {dtype}; "
            f"available: {', '.join(available)}"
        )
    log.info("varlen attention backend: %s (available on %s: %s)", choice, device.type, ", ".join(available))
    return choice


def _make_buckets(
    lengths: list[int], offsets: list[int], device: torch.device, solo_min: int
) -> tuple[list[_Bucket], list[tuple[int, int]]]:
    solo = [(offsets[i], n) for i, n in enumerate(lengths) if n >= solo_min]
    order = sorted((i for i, n in enumerate(lengths) if n < solo_min), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        # Sorted ascending, so n is the longest so far: padded area is (count) * n * n.
        if current and (len(current) + 1) * n * n > _BUCKET_WASTE * (real + n * n):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n * n
    if current:
        groups.append(current)

    buckets = []
    for members in groups:
        longest = max(lengths[i] for i in members)
        gather: list[int] = []
        slot_group: list[int] = []
        slot_pos: list[int] = []
        scatter: list[int] = []
        for g, i in enumerate(members):
            start, n = offsets[i], lengths[i]
            gather.extend(range(start, start + n))
            # Padding slots repeat the sequence's first token: the key mask hides them from real
            # queries, and the padded query rows are never read back.
            gather.extend([start] * (longest - n))
            slot_group.extend([g] * n)
            slot_pos.extend(range(n))
            scatter.extend(range(start, start + n))
        padded = any(lengths[i] != longest for i in members)
        key_mask = None
        if padded:
            key_mask = (
                torch.arange(longest).unsqueeze(0) < torch.tensor([lengths[i] for i in members]).unsqueeze(1)
            ).view(len(members), 1, 1, longest).to(device)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        buckets.append(
            _Bucket(
                gather=as_tensor(gather),
                key_mask=key_mask,
                slot_group=as_tensor(slot_group),
                slot_pos=as_tensor(slot_pos),
                scatter=as_tensor(scatter),
                groups=len(members),
                length=longest,
            )
        )
    return buckets, solo


def prepare(
    backend: str,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: int | None = None,
    solo_min: int | None = None,
) -> AttentionBatch:
    """Build the per-pass metadata. ``cu_seqlens`` must already be on the compute device."""
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if window is not None and window >= max_seqlen:
        window = None  # the window covers every sequence whole: plain (causal) attention
    batch = AttentionBatch(backend, cu_seqlens, max_seqlen, lengths, causal, window)
    if backend == "sdpa_bucketed":
        batch.buckets, batch.solo = _make_buckets(
            lengths, offsets, cu_seqlens.device, SOLO_MIN_LENGTH if solo_min is None else solo_min
        )
    elif backend == "sdpa_segments":
        batch.solo = list(zip(offsets[:-1], lengths))
    return batch


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, *, scale: float | None = None
) -> torch.Tensor:
    """Attention within each packed sequence. q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``."""
    return _IMPLS[batch.backend](q, k, v, batch, scale)


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


def _flash_window(batch: AttentionBatch) -> tuple[int, int]:
    """(left, right) token distances a query may look, -1 for unlimited: flash-attention's convention."""
    reach = -1 if batch.window is None else batch.window - 1
    return reach, 0 if batch.causal else reach


def _mask(n: int, batch: AttentionBatch, device: torch.device) -> torch.Tensor | None:
    """``[n, n]`` bool, True where query row i may attend key column j; None when nothing is masked."""
    if not batch.causal and batch.window is None:
        return None
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    if batch.causal:
        allowed &= j <= i
    if batch.window is not None:
        allowed &= (i - j).abs() < batch.window
    return allowed


def _torch_varlen(q, k, v, batch: AttentionBatch, scale):
    from torch.nn.attention.varlen import varlen_attn

    window = _flash_window(batch)
    return varlen_attn(
        q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen,
        scale=scale, window_size=window, enable_gqa=_gqa(q, k),
    )


def _flash_attn(q, k, v, batch: AttentionBatch, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen,
        softmax_scale=scale, causal=batch.causal, window_size=_flash_window(batch),
    )


def _one_by_one(q, k, v, out, spans, batch: AttentionBatch, scale) -> None:
    gqa = _gqa(q, k)
    windowed = batch.window is not None
    for start, n in spans:
        end = start + n
        # Strided [1, H, n, D] views of the packed tensors: no copies in.
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks = k[start:end].transpose(0, 1).unsqueeze(0)
        vs = v[start:end].transpose(0, 1).unsqueeze(0)
        if windowed:
            mask = _mask(n, batch, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=batch.causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)


def _sdpa_segments(q, k, v, batch: AttentionBatch, scale):
    out = torch.empty_like(q)
    _one_by_one(q, k, v, out, batch.solo, batch, scale)
    return out


def _sdpa_bucketed(q, k, v, batch: AttentionBatch, scale):
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    gqa = Hq != Hkv
    out = torch.empty_like(q)
    _one_by_one(q, k, v, out, batch.solo, batch, scale)
    for b in batch.buckets:
        G, L = b.groups, b.length
        qs = q.index_select(0, b.gather).view(G, L, Hq, D).transpose(1, 2)  # [G, Hq, L, D]
        ks = k.index_select(0, b.gather).view(G, L, Hkv, D).transpose(1, 2)
        vs = v.index_select(0, b.gather).view(G, L, Hkv, D).transpose(1, 2)
        shape = _mask(L, batch, q.device)  # [L, L] causal / window, shared by every group
        if shape is None:
            mask = b.key_mask
        elif batch.causal and batch.window is None:
            # Right padding: causal masking alone keeps real queries off the padded keys.
            mask = None
        else:
            mask = shape if b.key_mask is None else shape & b.key_mask  # [G, 1, L, L]
        if mask is None and batch.causal:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        # o [G, Hq, L, D]: pick the real (group, position) slots straight into packed order.
        out.index_copy_(0, b.scatter, o[b.slot_group, :, b.slot_pos])
    return out


def _dense(q, k, v, batch: AttentionBatch, scale):
    T = q.shape[0]
    seg = torch.repeat_interleave(
        torch.arange(len(batch.lengths), device=q.device),
        torch.tensor(batch.lengths, device=q.device),
    )
    mask = seg[:, None] == seg[None, :]  # [T, T]
    packed = _mask(T, batch, q.device)  # within a sequence, packed index distance = position distance
    if packed is not None:
        mask &= packed
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale, enable_gqa=_gqa(q, k),
    )
    return o[0].transpose(0, 1)


_IMPLS = {
    "torch_varlen": _torch_varlen,
    "flash_attn": _flash_attn,
    "sdpa_bucketed": _sdpa_bucketed,
    "sdpa_segments": _sdpa_segments,
    "dense": _dense,
}

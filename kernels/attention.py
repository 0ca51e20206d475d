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
import inspect
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
    gather: torch.Tensor  # [G * L] query token index per padded slot (padding repeats a real token, masked off)
    k_gather: torch.Tensor  # the same slots in the packed keys (whose offsets differ when others are chunks)
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
    # (query start, query length, key start, key length) of the sequences run one SDPA call each
    solo: list[tuple[int, int, int, int]] = field(default_factory=list)
    cu_seqlens_k: torch.Tensor | None = None  # None: keys are the queries' own tokens
    max_seqlen_k: int = 0
    k_lengths: list[int] = field(default_factory=list)


# varlen_attn arrived in torch 2.9 with is_causal only; scale and window_size came in 2.10, GQA in 2.12.
_VARLEN_NEEDS = ("scale", "window_size", "enable_gqa")


def _torch_varlen_usable() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    params = inspect.signature(varlen_attn).parameters
    missing = [p for p in _VARLEN_NEEDS if p not in params]
    if missing:
        log.info("torch.nn.attention.varlen.varlen_attn lacks %s in torch %s: not used", missing, torch.__version__)
    return not missing


def _available_backends(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    found = []
    # The flash kernels take fp16/bf16 only: fp32 on CUDA runs SDPA.
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen_usable():
            found.append("torch_varlen")
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
    lengths: list[int], offsets: list[int], k_offsets: list[int], device: torch.device, solo_min: int,
    alone: set[int],
) -> tuple[list[_Bucket], list[int]]:
    solo = [i for i, n in enumerate(lengths) if n >= solo_min or i in alone]
    order = sorted((i for i, n in enumerate(lengths) if n < solo_min and i not in alone), key=lambda i: lengths[i])
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
        k_gather: list[int] = []
        slot_group: list[int] = []
        slot_pos: list[int] = []
        scatter: list[int] = []
        for g, i in enumerate(members):
            start, n = offsets[i], lengths[i]
            gather.extend(range(start, start + n))
            # Padding slots repeat the sequence's first token: the key mask hides them from real
            # queries, and the padded query rows are never read back.
            gather.extend([start] * (longest - n))
            k_start = k_offsets[i]
            k_gather.extend(range(k_start, k_start + n))
            k_gather.extend([k_start] * (longest - n))
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
                k_gather=as_tensor(gather) if k_offsets is offsets else as_tensor(k_gather),
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
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> AttentionBatch:
    """Build the per-pass metadata. ``cu_seqlens`` must already be on the compute device.

    ``cu_seqlens_k``: when a sequence's keys are more than its queries (a chunk of a long input attending to
    the cached keys of its earlier chunks), the key offsets. The queries are then the *last* tokens of their
    sequence: causal masking aligns them to the end of the keys.
    """
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if cu_seqlens_k is None:
        k_offsets, k_lengths, max_k = offsets, lengths, max_seqlen
    else:
        k_offsets = cu_seqlens_k.tolist()
        k_lengths = [b - a for a, b in zip(k_offsets[:-1], k_offsets[1:])]
        max_k = max_seqlen_k or max(k_lengths)
    if window is not None and window >= max_k:
        window = None  # the window covers every sequence whole: plain (causal) attention
    batch = AttentionBatch(backend, cu_seqlens, max_seqlen, lengths, causal, window)
    batch.k_lengths = k_lengths
    batch.max_seqlen_k = max_k
    if cu_seqlens_k is not None:
        batch.cu_seqlens_k = cu_seqlens_k
    prefixed = {i for i, (n, nk) in enumerate(zip(lengths, k_lengths)) if n != nk}
    if backend == "sdpa_bucketed":
        batch.buckets, solo = _make_buckets(
            lengths, offsets, k_offsets, cu_seqlens.device, SOLO_MIN_LENGTH if solo_min is None else solo_min,
            prefixed,
        )
    elif backend == "sdpa_segments":
        solo = list(range(len(lengths)))
    else:
        solo = []
    batch.solo = [(offsets[i], lengths[i], k_offsets[i], k_lengths[i]) for i in solo]
    return batch


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, *, scale: float | None = None
) -> torch.Tensor:
    """Attention within each packed sequence. q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` -> ``[Tq, Hq, D]``."""
    return _IMPLS[batch.backend](q, k, v, batch, scale)


def _gqa(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[1] != k.shape[1]


def _flash_window(batch: AttentionBatch) -> tuple[int, int]:
    """(left, right) token distances a query may look, -1 for unlimited: flash-attention's convention."""
    reach = -1 if batch.window is None else batch.window - 1
    return reach, 0 if batch.causal else reach


def _mask(n: int, batch: AttentionBatch, device: torch.device, nk: int | None = None) -> torch.Tensor | None:
    """``[n, nk]`` bool, True where query row i may attend key column j; None when nothing is masked.
    Queries are the last ``n`` of the ``nk`` positions (bottom-right alignment)."""
    nk = n if nk is None else nk
    if not batch.causal and batch.window is None:
        return None
    i = torch.arange(nk - n, nk, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    allowed = torch.ones(n, nk, dtype=torch.bool, device=device)
    if batch.causal:
        allowed &= j <= i
    if batch.window is not None:
        allowed &= (i - j).abs() < batch.window
    return allowed


def _torch_varlen(q, k, v, batch: AttentionBatch, scale):
    from torch.nn.attention.varlen import varlen_attn

    window = _flash_window(batch)
    cu_k = batch.cu_seqlens if batch.cu_seqlens_k is None else batch.cu_seqlens_k
    return varlen_attn(
        q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, batch.max_seqlen_k,
        scale=scale, window_size=window, enable_gqa=_gqa(q, k),
    )


def _flash_attn(q, k, v, batch: AttentionBatch, scale):
    from flash_attn import flash_attn_varlen_func

    cu_k = batch.cu_seqlens if batch.cu_seqlens_k is None else batch.cu_seqlens_k
    return flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, batch.max_seqlen_k,
        softmax_scale=scale, causal=batch.causal, window_size=_flash_window(batch),
    )


def _one_by_one(q, k, v, out, spans, batch: AttentionBatch, scale) -> None:
    gqa = _gqa(q, k)
    windowed = batch.window is not None
    for start, n, k_start, nk in spans:
        # Strided [1, H, n, D] views of the packed tensors: no copies in.
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)
        ks = k[k_start : k_start + nk].transpose(0, 1).unsqueeze(0)
        vs = v[k_start : k_start + nk].transpose(0, 1).unsqueeze(0)
        if windowed or (batch.causal and nk != n):
            # SDPA's is_causal aligns top-left; a chunk after cached keys needs bottom-right: explicit mask.
            mask = _mask(n, batch, q.device, nk)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=batch.causal, scale=scale, enable_gqa=gqa)
        out[start : start + n] = o[0].transpose(0, 1)


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
        ks = k.index_select(0, b.k_gather).view(G, L, Hkv, D).transpose(1, 2)
        vs = v.index_select(0, b.k_gather).view(G, L, Hkv, D).transpose(1, 2)
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
    """One masked SDPA call over all packed tokens: the reference. Positions are counted from each
    sequence's first key, queries being its last tokens."""
    dev = q.device
    B = len(batch.lengths)
    q_len = torch.tensor(batch.lengths, device=dev)
    k_len = torch.tensor(batch.k_lengths, device=dev)
    q_seg = torch.repeat_interleave(torch.arange(B, device=dev), q_len)
    k_seg = torch.repeat_interleave(torch.arange(B, device=dev), k_len)
    q_first = torch.cumsum(q_len, 0) - q_len
    k_first = torch.cumsum(k_len, 0) - k_len
    q_pos = torch.arange(q.shape[0], device=dev) - q_first[q_seg] + (k_len - q_len)[q_seg]
    k_pos = torch.arange(k.shape[0], device=dev) - k_first[k_seg]
    mask = q_seg[:, None] == k_seg[None, :]  # [Tq, Tk]
    if batch.causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if batch.window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]).abs() < batch.window
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

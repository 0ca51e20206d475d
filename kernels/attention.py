"""Varlen attention over packed tokens, behind one function.

Sequences are concatenated along the token axis: ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` and
``cu_seqlens [B+1]`` (int32 offsets). A token attends only to tokens of its own sequence.

Backends, chosen once per model at start-up by :func:`select_backend` (from the model's
:class:`AttentionShape`, the device, the dtype and what this torch offers) and logged:

- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA, fp16/bf16). Its signature grew
  release by release (:class:`VarlenCaps`): 2.10 takes ``is_causal`` only, 2.11 adds ``scale`` and
  ``window_size``, 2.12 ``enable_gqa`` and ``num_splits``. What an older one lacks is made up around the
  call: GQA by expanding K/V heads, a scale by scaling q; only sliding windows need 2.11.
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``, when that package imports and runs a tiny call.
- ``sdpa_bucketed``: sequences sorted by length and grouped so that padding stays small; each group is
  gathered into a padded ``[G, H, L, D]`` block for one SDPA call and scattered back. Padding lives
  inside attention only: every other layer runs on the packed tokens. The CPU default and the CUDA
  fallback (fp32, or no flash kernel for the model). On CPU, sequences of up to ``ROW_TOKENS`` tokens share
  rows: several whole sequences side by side in one padded row, kept apart by a block-diagonal mask built
  once per pass (the CPU kernel's cost goes by calls and rows far more than by scores at these lengths);
  longer sequences of ``SOLO_MIN_LENGTH`` tokens or more run as one SDPA call each (measured by
  ``benchmarks/bench_kernels.py``). On CUDA every length is bucketed, one sequence per row, and SDPA runs
  with its math kernel switched off: a mask or fp32 with GQA expands K/V heads so that the memory-efficient
  kernel takes the call, never a ``[heads, n, n_keys]`` score tensor.
- ``sdpa_segments``: one SDPA call per sequence.
- ``dense``: one ``[T, T]`` block-diagonal masked SDPA call. The reference the others are tested against.

Callers build an :class:`AttentionBatch` once per forward pass with :func:`prepare` (it holds the host-side
bookkeeping; given the host ``lengths``, it never waits on the device) and pass it to
:func:`varlen_attention` in every layer.

Masking: ``causal`` keeps a token off later tokens; ``window`` (transformers' ``sliding_window``) keeps it
off tokens ``window`` or more positions away (only earlier ones matter when causal). Query and key tokens of
different sequences never see each other. GQA (fewer key/value heads than query heads) works everywhere.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("torch_varlen", "flash_attn", "sdpa_bucketed", "sdpa_segments", "dense")
HALF = (torch.float16, torch.bfloat16)

# Bucketing: a group's padded area (count * longest^2) may exceed its real area by this factor.
_BUCKET_WASTE = 1.3
# CPU: sequences of up to this many tokens share padded rows, several whole sequences to a row of at most this
# length (best fit, longest first), kept apart by a block-diagonal mask. At these lengths SDPA's CPU kernel costs
# about as much per row and per call whatever the row's length (benchmarks/bench_kernels.py: one call on 4,096
# tokens in rows of 16 to 128 tokens takes about the same time), so fewer, fuller rows beat a row per sequence.
ROW_TOKENS = 128
# CPU: sequences at least this long run as their own SDPA call on a strided view (no gather, no padding); shorter
# ones are bucketed (up to ROW_TOKENS, in shared rows), where one call for many sequences beats a call each. The
# default: every sequence that fits a shared row shares one. An engine measures its own model's crossover at
# load (measure_solo_min). CUDA buckets every length.
SOLO_MIN_LENGTH = ROW_TOKENS + 1
# The flash kernels take head dims up to 256, in multiples of 8 (smaller multiples are zero-padded here).
FLASH_MAX_HEAD_DIM = 256
_HEAD_DIM_ALIGN = 8


# -- what the model asks, what the torch offers, and the choice ---------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    """What a model asks of attention. The backend is chosen per model from it."""

    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    window: bool = False  # some layer attends within a sliding window
    chunked: bool = False  # chunks of long inputs attend to the cached keys of earlier chunks (cu_seqlens_k)
    relative_bias: bool = False  # an additive per-head bias by relative position (MPNet's buckets)

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    def describe(self) -> str:
        parts = ["causal" if self.causal else "bidirectional", "GQA" if self.gqa else "MHA",
                 f"{self.heads} heads of {self.head_dim}"]
        if self.window:
            parts.append("sliding windows")
        if self.chunked:
            parts.append("chunks over cached keys")
        if self.relative_bias:
            parts.append("relative position bias")
        return ", ".join(parts)


@dataclass(frozen=True)
class VarlenCaps:
    """What this torch's ``varlen_attn`` takes. All False: no ``torch.nn.attention.varlen`` (torch <= 2.9)."""

    present: bool = False
    scale: bool = False  # 2.11
    window: bool = False  # 2.11: window_size, and causal is window_size (-1, 0) rather than is_causal
    gqa: bool = False  # 2.12: enable_gqa
    num_splits: bool = False  # 2.12: num_splits=1 keeps a sequence's result independent of its batch

    @classmethod
    def from_params(cls, params: Collection[str] | None) -> VarlenCaps:
        if params is None:
            return cls()
        return cls(True, "scale" in params, "window_size" in params, "enable_gqa" in params, "num_splits" in params)

    def describe(self) -> str:
        if not self.present:
            return "no varlen_attn"
        took = [n for n, on in (("scale", self.scale), ("window_size", self.window), ("enable_gqa", self.gqa)) if on]
        return "varlen_attn(" + (", ".join(took) if took else "is_causal only") + ")"


@functools.lru_cache(maxsize=1)
def torch_varlen_caps() -> VarlenCaps:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return VarlenCaps()
    return VarlenCaps.from_params(set(inspect.signature(varlen_attn).parameters))


@functools.lru_cache(maxsize=8)
def flash_attn_works(device_index: int = 0) -> str | None:
    """None when the flash_attn package imports and runs a tiny varlen call on this GPU; else why not.
    A package that imports but was built for another torch or GPU fails here, at start-up, not mid-request."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as e:  # ImportError, or an extension built against another torch (OSError, RuntimeError)
        return f"flash_attn does not import ({type(e).__name__}: {e})"
    try:
        dev = torch.device("cuda", device_index)
        q = torch.randn(5, 2, 64, device=dev, dtype=torch.float16)
        cu = torch.tensor([0, 2, 5], device=dev, dtype=torch.int32)
        out = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True)
        torch.cuda.synchronize(dev)
        if out.shape != q.shape or not bool(torch.isfinite(out).all()):
            return "flash_attn's test call gave a wrong answer"
    except Exception as e:
        return f"flash_attn's test call failed ({type(e).__name__}: {e})"
    return None


FLASH_MIN_CAPABILITY = (8, 0)  # FlashAttention-2 (torch's varlen_attn, flash_attn): Ampere or newer


def _flash_problem(device_type: str, dtype: torch.dtype, shape: AttentionShape,
                   capability: tuple[int, int] | None = None) -> str | None:
    if device_type != "cuda":
        return f"flash kernels run on CUDA only, not {device_type}"
    if capability is not None and capability < FLASH_MIN_CAPABILITY:
        return (f"flash kernels need compute capability {FLASH_MIN_CAPABILITY[0]}.{FLASH_MIN_CAPABILITY[1]} "
                f"(Ampere) or newer; this GPU is sm_{capability[0]}{capability[1]}")
    if dtype not in HALF:
        return f"flash kernels take float16/bfloat16, not {str(dtype).removeprefix('torch.')}"
    if shape.head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash kernels take head dims up to {FLASH_MAX_HEAD_DIM}, not {shape.head_dim}"
    return None


def backend_problems(
    device_type: str, dtype: torch.dtype, shape: AttentionShape, *, caps: VarlenCaps, flash_attn: str | None,
    capability: tuple[int, int] | None = None,
) -> dict[str, str | None]:
    """For each backend, None if it can serve a model of ``shape``, else why it cannot. Pure: the table test
    feeds it every torch signature and GPU generation. ``flash_attn``: :func:`flash_attn_works`'s answer;
    ``capability``: the CUDA device's compute capability (None: not known, or not CUDA)."""
    flash = _flash_problem(device_type, dtype, shape, capability)
    if flash is None and shape.relative_bias:
        flash = "flash kernels add no per-position attention bias, and the model has relative position buckets"
    varlen = flash
    if varlen is None and not caps.present:
        varlen = f"torch {torch.__version__.split('+')[0]} has no torch.nn.attention.varlen (torch >= 2.10)"
    elif varlen is None and shape.window and not caps.window:
        varlen = "this torch's varlen_attn takes no window_size (torch >= 2.11) and the model has sliding windows"
    return {
        "torch_varlen": varlen,
        "flash_attn": flash or flash_attn,
        "sdpa_bucketed": None,
        "sdpa_segments": None,
        "dense": None,
    }


def choose_backend(
    device_type: str, dtype: torch.dtype, shape: AttentionShape, requested: str | None = "auto", *,
    caps: VarlenCaps, flash_attn: str | None, capability: tuple[int, int] | None = None,
) -> str:
    """The backend for one model: the first usable of :data:`BACKENDS` for ``auto``; an explicit choice that
    cannot serve this model is an error that says why, never a silent downgrade."""
    problems = backend_problems(device_type, dtype, shape, caps=caps, flash_attn=flash_attn, capability=capability)
    usable = [b for b in BACKENDS if problems[b] is None]
    if requested in ("auto", None):
        return usable[0]
    name = "sdpa_bucketed" if requested == "sdpa" else requested
    if name not in problems:
        raise ValueError(f"unknown attention backend {requested!r}; known: auto, sdpa, {', '.join(BACKENDS)}")
    if problems[name] is not None:
        raise ValueError(
            f"attention backend {requested!r} cannot serve this model ({shape.describe()}) on {device_type} with "
            f"{str(dtype).removeprefix('torch.')}: {problems[name]}. Usable here: {', '.join(usable)}"
        )
    return name


_DEFAULT_SHAPE = AttentionShape(heads=1, kv_heads=1, head_dim=64)


def _flash_capable(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in HALF


def _probe_flash_attn(device: torch.device, dtype: torch.dtype) -> str | None:
    if not _flash_capable(device, dtype):
        return "flash kernels need CUDA and float16/bfloat16"
    return flash_attn_works(device.index or 0)


def _caps_for(device: torch.device, dtype: torch.dtype) -> VarlenCaps:
    # Importing torch.nn.attention.varlen registers custom ops (about a second on a CPU): only where it can run.
    return torch_varlen_caps() if _flash_capable(device, dtype) else VarlenCaps()


def usable_backends(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, shape: AttentionShape = _DEFAULT_SHAPE
) -> list[str]:
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    problems = backend_problems(device.type, dtype, shape, caps=_caps_for(device, dtype),
                                flash_attn=_probe_flash_attn(device, dtype), capability=capability)
    return [b for b in BACKENDS if problems[b] is None]


def select_backend(
    device: torch.device, requested: str = "auto", dtype: torch.dtype = torch.float32,
    shape: AttentionShape = _DEFAULT_SHAPE,
) -> str:
    """Pick the backend for a model of ``shape`` on this device and torch, and log the choice and why the
    faster ones were passed over."""
    caps = _caps_for(device, dtype)
    flash = _probe_flash_attn(device, dtype)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    choice = choose_backend(device.type, dtype, shape, requested, caps=caps, flash_attn=flash, capability=capability)
    problems = backend_problems(device.type, dtype, shape, caps=caps, flash_attn=flash, capability=capability)
    passed = [f"{b}: {problems[b]}" for b in BACKENDS[: BACKENDS.index(choice)] if problems[b]]
    log.info(
        "varlen attention backend: %s for %s on %s (torch %s%s)%s", choice, shape.describe(), device.type,
        torch.__version__, f": {caps.describe()}" if _flash_capable(device, dtype) else "",
        ("; not " + "; not ".join(passed)) if passed else "",
    )
    return choice


def measure_solo_min(
    shape: AttentionShape, dtype: torch.dtype, *, tokens: int = 2048, lengths: Sequence[int] = (16, 32, 64, 128, 256),
    repeats: int = 5,
) -> tuple[int, str]:
    """On the CPU: from which sequence length one SDPA call per sequence is no slower than bucketing
    equal-length sequences together, timed for this model's heads and dtype on ``tokens``-token passes (the
    best of ``repeats`` runs each way). The answer is the shortest tried length from which one call each wins
    at *every* longer tried length too, so one noisy sample cannot send short sequences one call each (that
    costs several times the attention time); near-ties keep :data:`SOLO_MIN_LENGTH` (:func:`solo_min_from`).
    Returns the length and the timings in words."""
    timed = []
    for n in lengths:
        count = max(2, tokens // n)
        q = torch.randn(count * n, shape.heads, shape.head_dim).to(dtype)
        k = torch.randn(count * n, shape.kv_heads, shape.head_dim).to(dtype)
        cu = torch.arange(0, (count + 1) * n, n, dtype=torch.int32)
        each = [n] * count
        best = {}
        for name, solo_min in (("bucketed", sys.maxsize), ("solo", 0)):
            batch = prepare("sdpa_bucketed", cu, n, causal=shape.causal, solo_min=solo_min, lengths=each)
            varlen_attention(q, k, k, batch)  # the first run builds the kernels and is not counted
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                varlen_attention(q, k, k, batch)
                runs.append(time.perf_counter() - start)
            best[name] = min(runs)
        timed.append((n, best["bucketed"], best["solo"]))
    return solo_min_from(timed), ", ".join(f"{n}: {b * 1e3:.1f}/{s * 1e3:.1f} ms" for n, b, s in timed)


def solo_min_from(timed: Sequence[tuple[int, float, float]], default: int = SOLO_MIN_LENGTH) -> int:
    """The split :func:`measure_solo_min` answers from its (length, bucketed time, solo time) rows, shortest
    first: the shortest length from which one call each wins at every longer one (twice the last when bucketing
    wins there), moved away from ``default`` only where the side it moves to is clearly (10%) faster at every
    tried length in between. Near-ties keep the default, so restarts on a noisy host mostly keep the same split
    (and give bit-identical vectors)."""
    answer = 2 * timed[-1][0]
    for n, bucketed, solo in reversed(timed):
        if solo > bucketed:
            break
        answer = n
    between = [(bucketed, solo) for n, bucketed, solo in timed if min(answer, default) <= n < max(answer, default)]
    if not between:
        return default  # no tried length lies between: nothing shows the default wrong
    if answer < default and not all(solo * 1.1 <= bucketed for bucketed, solo in between):
        return default
    if answer > default and not all(bucketed * 1.1 <= solo for bucketed, solo in between):
        return default
    return answer


# -- per forward pass ------------------------------------------------------------------------------------------


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
    # Shared rows: [G, L] which sequence of its row each slot holds (padding slots: a negative number of their
    # own). None: one sequence per row, starting at its first slot.
    segments: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)  # shared rows' SDPA masks by dtype, built by the first layer


@dataclass
class AttentionBatch:
    """Per-forward-pass metadata shared by every layer."""

    backend: str
    cu_seqlens: torch.Tensor  # [B+1] int32 on the compute device
    max_seqlen: int
    lengths: list[int] | None  # host copies; None for the flash backends, which need none
    causal: bool = False
    window: int | None = None
    buckets: list[_Bucket] = field(default_factory=list)
    # (query start, query length, key start, key length) of the sequences run one SDPA call each
    solo: list[tuple[int, int, int, int]] = field(default_factory=list)
    cu_seqlens_k: torch.Tensor | None = None  # None: keys are the queries' own tokens
    max_seqlen_k: int = 0
    k_lengths: list[int] | None = None
    # [H, 2 * max_seqlen - 1]: bias added to the score of key j for query i, at column j - i + max_seqlen - 1
    rel_bias: torch.Tensor | None = None
    # hidden tails: the packed tokens that are keys (the others are queries only); None: every token is a key
    key_index: torch.Tensor | None = None
    # q, k and v are cast to this dtype for attention, its output back to theirs; None: their own
    dtype: torch.dtype | None = None


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """One host list -> one int64 tensor on ``device``; on CUDA through pinned memory, without waiting."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _shared_rows(members: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequences into rows of at most ``capacity`` tokens: longest first, each into the fullest row it fits
    (best fit decreasing), so rows come out nearly full."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row), ascending
    for i in sorted(members, key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, r = rooms.pop(at)
            rows[r].append(i)
            bisect.insort(rooms, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(rooms, (capacity - n, len(rows) - 1))
    return rows


def _make_buckets(
    lengths: list[int], offsets: list[int], k_offsets: list[int], device: torch.device, solo_min: int,
    alone: set[int], row: int = 0,
) -> tuple[list[_Bucket], list[int]]:
    """The groups of one pass, and the sequences run one call each. ``row``: sequences of up to this many tokens
    share rows (the CPU); 0: one sequence per row."""
    solo = [i for i, n in enumerate(lengths) if n >= solo_min or i in alone]
    rest = [i for i, n in enumerate(lengths) if n < solo_min and i not in alone]
    shared = [i for i in rest if lengths[i] <= row]
    order = sorted((i for i in rest if lengths[i] > row), key=lambda i: lengths[i])
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
    rows = [[i] for i in itertools.chain.from_iterable(groups)]
    bounds = list(itertools.accumulate(len(g) for g in groups))
    if shared:
        rows += _shared_rows(shared, lengths, row)
        bounds.append(len(rows))

    # Every index list of every bucket goes to the device as one tensor; the buckets hold views of it.
    flat: list[int] = []
    spans: list[tuple[int, bool, list[int]]] = []
    for first, last in zip([0, *bounds[:-1]], bounds):
        members = rows[first:last]
        together = any(len(r) > 1 for r in members)
        fills = [sum(lengths[i] for i in r) for r in members]
        longest = max(fills)
        if together:
            longest = min(row, -(-longest // 16) * 16)  # few row lengths, so the kernels' shapes repeat
        gather: list[int] = []
        k_gather: list[int] = []
        slot_group: list[int] = []
        slot_pos: list[int] = []
        scatter: list[int] = []
        segments: list[int] = []
        for g, (seqs, fill) in enumerate(zip(members, fills)):
            at = 0
            for s, i in enumerate(seqs):
                start, n, k_start = offsets[i], lengths[i], k_offsets[i]
                gather.extend(range(start, start + n))
                k_gather.extend(range(k_start, k_start + n))
                slot_group.extend([g] * n)
                slot_pos.extend(range(at, at + n))
                scatter.extend(range(start, start + n))
                segments.extend([s] * n)
                at += n
            # Padding slots repeat the row's first token: the masks hide them from real queries, and the
            # padded query rows are never read back. In a shared row each is a sequence of its own.
            gather.extend([offsets[seqs[0]]] * (longest - fill))
            k_gather.extend([k_offsets[seqs[0]]] * (longest - fill))
            segments.extend(range(-1 - g * longest - fill, -1 - (g + 1) * longest, -1))
        marks = [len(flat)]
        for part in (gather, k_gather, slot_group, slot_pos, scatter, fills, segments if together else []):
            flat.extend(part)
            marks.append(len(flat))
        spans.append((longest, together, fills, marks))
    every = _to_device(flat, device) if flat else None
    buckets = []
    for (first, last), (longest, together, fills, m) in zip(zip([0, *bounds[:-1]], bounds), spans):
        view = [every[a:b] for a, b in zip(m[:-1], m[1:])]
        G = last - first
        key_mask = None
        if not together and any(fill != longest for fill in fills):
            key_mask = (torch.arange(longest, device=device).unsqueeze(0) < view[5].unsqueeze(1)).view(
                G, 1, 1, longest
            )
        buckets.append(
            _Bucket(
                gather=view[0],
                k_gather=view[0] if k_offsets is offsets else view[1],
                key_mask=key_mask,
                slot_group=view[2],
                slot_pos=view[3],
                scatter=view[4],
                groups=G,
                length=longest,
                segments=view[6].view(G, longest) if together else None,
            )
        )
    return buckets, solo


def _host_lengths(cu: torch.Tensor, given: Sequence[int] | None) -> tuple[list[int], list[int]]:
    if given is None:
        offsets = cu.tolist()  # waits for the device: callers on the serving path pass host lengths
        return [b - a for a, b in zip(offsets[:-1], offsets[1:])], offsets
    lengths = list(given)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return lengths, offsets


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
    lengths: Sequence[int] | None = None,
    k_lengths: Sequence[int] | None = None,
    rel_bias: torch.Tensor | None = None,
    tails: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionBatch:
    """Build the per-pass metadata. ``cu_seqlens`` must already be on the compute device; ``lengths`` (and
    ``k_lengths``) are the host copies of what it encodes: given, nothing here waits on the device.

    ``cu_seqlens_k``: when a sequence's keys are more than its queries (a chunk of a long input attending to
    the cached keys of its earlier chunks), the key offsets. The queries are then the *last* tokens of their
    sequence: causal masking aligns them to the end of the keys.

    ``rel_bias``: ``[H, 2 * max_seqlen - 1]`` additive scores by relative position (key minus query, offset by
    ``max_seqlen - 1``); the flash backends cannot take it (``AttentionShape.relative_bias``).

    ``tails``: per sequence, how many of its last tokens are queries only, never keys (a ColBERT query's [MASK]
    expansion tokens that the model does not attend to: they read the text's tokens and nothing reads them).
    Needs ``lengths``; a tail never meets cached keys, a relative bias, or a window it does not fit in (the
    loader's checks), so the keys' alignment does not matter.

    ``dtype``: attention computes in it whatever q, k and v come in (bfloat16 between the float32 layers of an
    int8 model on a CPU with native bf16), and answers in theirs.
    """
    key_index = None
    if tails is not None and any(tails):
        if cu_seqlens_k is not None or rel_bias is not None or lengths is None:
            raise ValueError("this is a bug: hidden tails with cached keys, a relative bias or no host lengths")
        k_lengths, kept, at = [], [], 0
        for n, t in zip(lengths, tails):
            k_lengths.append(n - t)
            kept.extend(range(at, at + n - t))
            at += n
        key_index = _to_device(kept, cu_seqlens.device)
        cu_seqlens_k = _to_device([0] + list(itertools.accumulate(k_lengths)), cu_seqlens.device).to(torch.int32)
        max_seqlen_k = max(k_lengths)
    flash = backend in ("torch_varlen", "flash_attn")
    if rel_bias is not None and (flash or cu_seqlens_k is not None or rel_bias.shape[-1] != 2 * max_seqlen - 1):
        raise ValueError(f"this is a bug: a relative bias of shape {tuple(rel_bias.shape)} with backend {backend}, "
                         f"max_seqlen {max_seqlen}{', cached keys' if cu_seqlens_k is not None else ''}")
    if cu_seqlens_k is not None and max_seqlen_k is None:
        k_lengths = _host_lengths(cu_seqlens_k, k_lengths)[0]
        max_seqlen_k = max(k_lengths)
    max_k = max_seqlen if cu_seqlens_k is None else max_seqlen_k
    if window is not None and window >= max_k:
        window = None  # the window covers every sequence whole: plain (causal) attention
    batch = AttentionBatch(backend, cu_seqlens, max_seqlen, None, causal, window, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_k=max_k, rel_bias=rel_bias, key_index=key_index, dtype=dtype)
    if flash:
        return batch  # the kernels read the offsets on the device
    q_lengths, offsets = _host_lengths(cu_seqlens, lengths)
    if cu_seqlens_k is None:
        kl, k_offsets = q_lengths, offsets
    else:
        kl, k_offsets = _host_lengths(cu_seqlens_k, k_lengths)
    batch.lengths, batch.k_lengths = q_lengths, kl
    prefixed = {i for i, (n, nk) in enumerate(zip(q_lengths, kl)) if n != nk}
    if backend == "sdpa_bucketed":
        if solo_min is None:
            solo_min = sys.maxsize if cu_seqlens.device.type == "cuda" else SOLO_MIN_LENGTH
        row = 0 if cu_seqlens.device.type == "cuda" else ROW_TOKENS
        batch.buckets, solo = _make_buckets(q_lengths, offsets, k_offsets, cu_seqlens.device, solo_min, prefixed,
                                            row)
    elif backend == "sdpa_segments":
        solo = list(range(len(q_lengths)))
    else:
        solo = []
    batch.solo = [(offsets[i], q_lengths[i], k_offsets[i], kl[i]) for i in solo]
    return batch


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, *, scale: float | None = None
) -> torch.Tensor:
    """Attention within each packed sequence. q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` -> ``[Tq, Hq, D]``."""
    answer = q.dtype
    if batch.dtype is not None:
        q, k, v = q.to(batch.dtype), k.to(batch.dtype), v.to(batch.dtype)
    if batch.key_index is not None:  # hidden tails: only the tokens that are keys
        k, v = k.index_select(0, batch.key_index), v.index_select(0, batch.key_index)
    D = q.shape[-1]
    if q.is_cuda and D % _HEAD_DIM_ALIGN:
        # Zero columns change no dot product; the padded output columns are cut off again. With this the
        # flash and memory-efficient kernels take any head dim.
        pad = _HEAD_DIM_ALIGN - D % _HEAD_DIM_ALIGN
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        return _IMPLS[batch.backend](q, k, v, batch, D**-0.5 if scale is None else scale)[..., :D].to(answer)
    return _IMPLS[batch.backend](q, k, v, batch, scale).to(answer)


# -- the backends ----------------------------------------------------------------------------------------------


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[T, Hkv, D]`` -> ``[T, heads, D]``: each key/value head repeated for its group of query heads."""
    rep = heads // k.shape[-2]
    return k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)


def _flash_window(batch: AttentionBatch) -> tuple[int, int]:
    """(left, right) token distances a query may look, -1 for unlimited: flash-attention's convention."""
    reach = -1 if batch.window is None else batch.window - 1
    return reach, 0 if batch.causal else reach


def _torch_varlen(q, k, v, batch: AttentionBatch, scale: float | None):
    from torch.nn.attention.varlen import varlen_attn

    caps = torch_varlen_caps()
    kw: dict = {}
    default = q.shape[-1] ** -0.5
    scale = default if scale is None else scale
    if q.shape[1] != k.shape[1]:
        if caps.gqa:
            kw["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, v, q.shape[1])
    if caps.scale:
        kw["scale"] = scale
    elif scale != default:
        q = q * (scale / default)  # a torch without `scale` applies the default: fold ours into q
    if caps.window:
        kw["window_size"] = _flash_window(batch)
    else:
        kw["is_causal"] = batch.causal  # choose_backend keeps windowed models off such a torch
    if caps.num_splits:
        kw["num_splits"] = 1  # no split-KV: a sequence's vector does not depend on what shares its batch
    cu_k = batch.cu_seqlens if batch.cu_seqlens_k is None else batch.cu_seqlens_k
    return varlen_attn(q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, batch.max_seqlen_k, **kw)


def _flash_attn(q, k, v, batch: AttentionBatch, scale: float | None):
    from flash_attn import flash_attn_varlen_func

    cu_k = batch.cu_seqlens if batch.cu_seqlens_k is None else batch.cu_seqlens_k
    return flash_attn_varlen_func(
        q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, batch.max_seqlen_k,
        softmax_scale=scale, causal=batch.causal, window_size=_flash_window(batch),
    )


def _no_math_on_cuda(t: torch.Tensor):
    """On CUDA, SDPA may use its flash, memory-efficient or cuDNN kernels but never the math one, which
    materialises every score: a call no fused kernel takes fails loudly instead of running slowly."""
    if not t.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def _sdpa(qs, ks, vs, *, mask=None, causal=False, scale=None):
    """SDPA on ``[G, H, L, D]`` blocks. On CUDA, GQA goes to the kernel only when the flash kernel can take
    the call (half precision, no mask); otherwise K/V heads are expanded for the memory-efficient kernel."""
    gqa = qs.shape[1] != ks.shape[1]
    if gqa and qs.is_cuda and (mask is not None or qs.dtype not in HALF):
        ks, vs = _expand_kv(ks.transpose(1, 2), vs.transpose(1, 2), qs.shape[1])
        ks, vs, gqa = ks.transpose(1, 2), vs.transpose(1, 2), False
    with _no_math_on_cuda(qs):
        if mask is None:
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=gqa)


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


def _biased(batch: AttentionBatch, allowed: torch.Tensor | None, rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float mask for SDPA: the relative bias at ``rel`` (key minus query positions, any shape ``S``) per head,
    ``[H, *S]``, with -inf where ``allowed`` (broadcast to it) is False."""
    bias = batch.rel_bias[:, rel + batch.max_seqlen - 1].to(dtype)
    if allowed is None:
        return bias
    return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=bias.device))


def _one_by_one(q, k, v, out, spans, batch: AttentionBatch, scale) -> None:
    windowed = batch.window is not None
    for start, n, k_start, nk in spans:
        # Strided [1, H, n, D] views of the packed tensors: no copies in.
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)
        ks = k[k_start : k_start + nk].transpose(0, 1).unsqueeze(0)
        vs = v[k_start : k_start + nk].transpose(0, 1).unsqueeze(0)
        if batch.rel_bias is not None:
            rel = torch.arange(nk, device=q.device)[None, :] - torch.arange(nk - n, nk, device=q.device)[:, None]
            mask = _biased(batch, _mask(n, batch, q.device, nk), rel, q.dtype).unsqueeze(0)  # [1, H, n, nk]
            o = _sdpa(qs, ks, vs, mask=mask, scale=scale)
        elif windowed or (batch.causal and nk != n):
            # SDPA's is_causal aligns top-left; a chunk after cached keys needs bottom-right: explicit mask.
            o = _sdpa(qs, ks, vs, mask=_mask(n, batch, q.device, nk), scale=scale)
        else:
            o = _sdpa(qs, ks, vs, causal=batch.causal, scale=scale)
        out[start : start + n] = o[0].transpose(0, 1)


def _sdpa_segments(q, k, v, batch: AttentionBatch, scale):
    out = torch.empty_like(q)
    _one_by_one(q, k, v, out, batch.solo, batch, scale)
    return out


def _one_per_row_mask(b: _Bucket, batch: AttentionBatch, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's mask for rows of one sequence each, from their first slot; None where none is needed."""
    L = b.length
    shape = _mask(L, batch, b.gather.device)  # [L, L] causal / window, shared by every group
    if batch.rel_bias is not None:
        allowed = shape if b.key_mask is None else (b.key_mask if shape is None else shape & b.key_mask)
        pos = torch.arange(L, device=b.gather.device)
        mask = _biased(batch, allowed, pos[None, :] - pos[:, None], dtype)  # [H, L, L] or [G, H, L, L]
        return mask.unsqueeze(0) if mask.dim() == 3 else mask
    if shape is None:
        return b.key_mask
    if batch.causal and batch.window is None:
        return None  # right padding: causal masking alone keeps real queries off the padded keys
    return shape if b.key_mask is None else shape & b.key_mask  # [G, 1, L, L]


def _shared_rows_mask(b: _Bucket, batch: AttentionBatch, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of shared rows, ``[G, 1, L, L]`` (``[G, H, L, L]`` with a relative bias): a slot sees
    the slots of its own sequence, within its causal / window reach. A sequence's slots are consecutive, so slot
    distances are position distances. Built by the first layer in its dtype and reused by the others."""
    seg = b.segments
    allowed = (seg.unsqueeze(2) == seg.unsqueeze(1)).unsqueeze(1)
    shape = _mask(b.length, batch, seg.device)
    if shape is not None:
        allowed = allowed & shape
    if batch.rel_bias is not None:
        pos = torch.arange(b.length, device=seg.device)
        # A row may be longer than any of its sequences: distances across sequences (masked) are clamped.
        rel = (pos[None, :] - pos[:, None]).clamp(1 - batch.max_seqlen, batch.max_seqlen - 1)
        return _biased(batch, allowed, rel, dtype)
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed, float("-inf"))


def _sdpa_bucketed(q, k, v, batch: AttentionBatch, scale):
    Hq, D = q.shape[1:]
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    _one_by_one(q, k, v, out, batch.solo, batch, scale)
    for b in batch.buckets:
        G, L = b.groups, b.length
        qs = q.index_select(0, b.gather).view(G, L, Hq, D).transpose(1, 2)  # [G, Hq, L, D]
        ks = k.index_select(0, b.k_gather).view(G, L, Hkv, D).transpose(1, 2)
        vs = v.index_select(0, b.k_gather).view(G, L, Hkv, D).transpose(1, 2)
        if b.segments is not None:
            mask = b.masks.get(q.dtype)
            if mask is None:
                mask = b.masks[q.dtype] = _shared_rows_mask(b, batch, q.dtype)
        else:
            mask = _one_per_row_mask(b, batch, q.dtype)
        o = _sdpa(qs, ks, vs, mask=mask, causal=mask is None and batch.causal, scale=scale)
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
    if batch.rel_bias is not None:
        rel = (k_pos[None, :] - q_pos[:, None]).clamp(1 - batch.max_seqlen, batch.max_seqlen - 1)  # across: masked
        mask = _biased(batch, mask, rel, q.dtype).unsqueeze(0)  # [1, H, Tq, Tk]
    o = _sdpa(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
              mask=mask, scale=scale)
    return o[0].transpose(0, 1)


_IMPLS = {
    "torch_varlen": _torch_varlen,
    "flash_attn": _flash_attn,
    "sdpa_bucketed": _sdpa_bucketed,
    "sdpa_segments": _sdpa_segments,
    "dense": _dense,
}

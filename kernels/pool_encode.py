"""Segment pooling + Matryoshka cut + L2 normalisation + the row's wire encoding, in one launch.

``pool_encode(hidden [T, H], cu_seqlens [B+1], mode, dims [B], normalize [B], encodings [B], *, offsets, total,
ranges, range_rows)`` returns

- ``vectors [B, H]`` float32: row b pooled (mean / cls / last, fp32 accumulation), zeroed past ``dims[b]``,
  L2-normalised when ``normalize[b]``;
- ``out [N]`` uint8 and ``offsets [B+1]`` int64: row b's encoding of its first ``dims[b]`` values at
  ``out[offsets[b]:offsets[b+1]]``, as ``encodings[b]`` (a code of :data:`ENCODINGS`) says: nothing (0);
  ``base64``: standard base64 (``=`` padded) of the little-endian float32 bytes; ``uint8`` / ``int8``: one byte
  per value, quantized with the ranges ``ranges[range_rows[b], :, :dims[b]]`` (``ranges [R, 2, H]`` float32:
  each dimension's low and high end); ``ubinary`` / ``binary``: one bit per value, ``dims[b] / 8`` bytes. The
  rules are :func:`embedserve.kernels.quantize.quantize`'s, which the twin calls.

The caller may pass the ``offsets [B+1]`` (on the device) and their ``total`` (on the host), computed on the host
where it already knows dims and the requests' encodings (:func:`encoded_lengths_host`). Otherwise they are
computed here (the Triton launcher then reads ``total`` back from the device: one sync).

Two implementations with that one signature: :func:`pool_encode_torch`, the pure-torch twin (the CPU path
and the test oracle), and :func:`pool_encode_triton`, one Triton program per sequence (the CUDA path; runs
on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI checks it). The backend is chosen once at
start-up by :func:`select_pool_backend` and logged.
"""

from __future__ import annotations

import base64 as _base64
import logging
from collections import defaultdict
from typing import Sequence

import torch

from embedserve.kernels.pooling import finish, pool
from embedserve.kernels.quantize import quantize

log = logging.getLogger(__name__)

MODES = {"mean": 0, "cls": 1, "last": 2}
# A row's wire encoding beside its float32 values: 0 is none.
ENCODINGS = {"base64": 1, "uint8": 2, "int8": 3, "ubinary": 4, "binary": 5}
ENCODING_NAMES = {code: name for name, code in ENCODINGS.items()}
_SCALAR = (ENCODINGS["uint8"], ENCODINGS["int8"])

try:  # triton ships with CUDA builds of torch; a CPU install need not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def _b64_chars(dims):
    # Base64 of 4 * dims float32 bytes: 4 characters per 3 bytes, the last group padded.
    return 4 * ((4 * dims + 2) // 3)


def encoded_lengths(dims: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Bytes of each row's encoding (0 where none). ``[B]`` int64."""
    dims, codes = dims.long(), codes.long()
    scalar = (codes == _SCALAR[0]) | (codes == _SCALAR[1])
    return torch.where(codes == 1, _b64_chars(dims), torch.where(scalar, dims, torch.where(codes >= 4, dims // 8, 0)))


def encoded_lengths_host(dims: Sequence[int], codes: Sequence[int]) -> list[int]:
    """:func:`encoded_lengths` on host lists: what the runner computes the offsets from without asking the
    device."""
    def one(k: int, code: int) -> int:
        if code == 1:
            return _b64_chars(k)
        if code in _SCALAR:
            return k
        return k // 8 if code else 0
    return [one(k, c) for k, c in zip(dims, codes)]


def _offsets(dims: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    lengths = encoded_lengths(dims, codes)
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def encode_rows(vectors: torch.Tensor, name: str, ranges: torch.Tensor | None = None) -> list[bytes]:
    """``[n, k]`` float32 rows (CPU) as ``name`` (a key of :data:`ENCODINGS`), one bytes object per row, without a
    Python loop over values; ``ranges [2, k]`` for int8 / uint8."""
    if name == "base64":
        return [_base64.b64encode(row.tobytes()) for row in vectors.numpy().astype("<f4", copy=False)]
    return [row.tobytes() for row in quantize(vectors, name, ranges).numpy()]


def pool_encode_torch(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    encodings: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    total: int | None = None,
    ranges: torch.Tensor | None = None,
    range_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vectors = finish(pool(hidden, cu_seqlens, mode), dims, normalize.bool())
    if offsets is None:
        offsets = _offsets(dims, encodings)
    codes = encodings.tolist()
    rows = [i for i, c in enumerate(codes) if c]
    if not rows:
        return vectors, torch.empty(0, dtype=torch.uint8), offsets
    host = vectors.cpu()
    ks = dims.tolist()
    which = range_rows.tolist() if range_rows is not None else [0] * len(codes)
    # Rows of one encoding, width and range set are encoded together: no Python loop over values.
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i in rows:
        groups[(codes[i], ks[i], which[i] if codes[i] in _SCALAR else 0)].append(i)
    pieces: dict[int, bytes] = {}
    for (code, k, r), idx in groups.items():
        lohi = ranges[r, :, :k].cpu() if code in _SCALAR else None
        pieces.update(zip(idx, encode_rows(host[idx, :k], ENCODING_NAMES[code], lohi)))
    encoded = b"".join(pieces[i] for i in rows)
    return vectors, torch.frombuffer(bytearray(encoded), dtype=torch.uint8), offsets


if triton is not None:

    @triton.jit
    def _b64_char(v):
        # 0-25 'A'.., 26-51 'a'.., 52-61 '0'.., 62 '+', 63 '/'
        return tl.where(v < 26, v + 65, tl.where(v < 52, v + 71, tl.where(v < 62, v - 4, tl.where(v == 62, 43, 47))))

    @triton.jit
    def _round_half_even(x):
        # torch.round's rule, exact for |x| < 2**23: x - floor(x) is exact there.
        f = tl.floor(x)
        d = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))

    @triton.jit
    def _pool_encode_kernel(
        hidden_ptr, stride_t, cu_ptr, dims_ptr, norm_ptr, code_ptr, off_ptr, ranges_ptr, rrow_ptr,
        vec_ptr, vec_bytes_ptr, out_ptr, H,
        MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
    ):
        b = tl.program_id(0)
        start = tl.load(cu_ptr + b)
        end = tl.load(cu_ptr + b + 1)
        k = tl.load(dims_ptr + b)
        offs_h = tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        if MODE == 0:
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                m = (offs_t < end)[:, None] & in_h[None, :]
                x = tl.load(hidden_ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_h[None, :], mask=m, other=0.0)
                acc += tl.sum(x.to(tl.float32), axis=0)  # [BLOCK_H]
            acc = acc / (end - start).to(tl.float32)
        elif MODE == 1:
            acc = tl.load(hidden_ptr + start.to(tl.int64) * stride_t + offs_h, mask=in_h, other=0.0).to(tl.float32)
        else:
            acc = tl.load(hidden_ptr + (end - 1).to(tl.int64) * stride_t + offs_h, mask=in_h, other=0.0).to(tl.float32)
        acc = tl.where(offs_h < k, acc, 0.0)
        norm = tl.sqrt(tl.sum(acc * acc, axis=0))
        acc = tl.where(tl.load(norm_ptr + b) != 0, acc / tl.maximum(norm, 1e-12), acc)
        tl.store(vec_ptr + b.to(tl.int64) * H + offs_h, acc, mask=in_h)

        code = tl.load(code_ptr + b)  # 0: no bytes for this row
        o0 = tl.load(off_ptr + b)
        out = out_ptr + o0
        if code == 1:
            # base64 of the row's little-endian bytes, read back from where they were just stored: make the
            # stores visible to every thread of this program first.
            tl.debug_barrier()
            nbytes = 4 * k
            ngroups = (nbytes + 2) // 3
            row = vec_bytes_ptr + b.to(tl.int64) * H * 4
            for g0 in range(0, ngroups, BLOCK_G):
                g = g0 + tl.arange(0, BLOCK_G)
                live = g < ngroups
                p = 3 * g
                x0 = tl.load(row + p, mask=live & (p < nbytes), other=0).to(tl.int32)
                x1 = tl.load(row + p + 1, mask=live & (p + 1 < nbytes), other=0).to(tl.int32)
                x2 = tl.load(row + p + 2, mask=live & (p + 2 < nbytes), other=0).to(tl.int32)
                c0 = _b64_char(x0 >> 2)
                c1 = _b64_char(((x0 & 3) << 4) | (x1 >> 4))
                c2 = tl.where(p + 1 < nbytes, _b64_char(((x1 & 15) << 2) | (x2 >> 6)), 61)  # '=' pads
                c3 = tl.where(p + 2 < nbytes, _b64_char(x2 & 63), 61)
                at = out + 4 * g
                tl.store(at, c0.to(tl.uint8), mask=live)
                tl.store(at + 1, c1.to(tl.uint8), mask=live)
                tl.store(at + 2, c2.to(tl.uint8), mask=live)
                tl.store(at + 3, c3.to(tl.uint8), mask=live)
        elif (code == 2) | (code == 3):
            # uint8 (2) / int8 (3): the level in 0..255 from this row's ranges; int8 is the level - 128, whose
            # two's-complement byte is the level with its top bit flipped.
            rr = tl.load(rrow_ptr + b).to(tl.int64) * 2 * H
            lo = tl.load(ranges_ptr + rr + offs_h, mask=in_h, other=0.0)
            hi = tl.load(ranges_ptr + rr + H + offs_h, mask=in_h, other=0.0)
            step = tl.div_rn(hi - lo, 255.0)
            step = tl.where(step == 0.0, 1.0, step)
            level = _round_half_even(tl.div_rn(acc - lo, step))
            level = tl.minimum(tl.maximum(level, 0.0), 255.0).to(tl.int32)
            level = tl.where(code == 3, level ^ 128, level)
            tl.store(out + offs_h, level.to(tl.uint8), mask=offs_h < k)
        elif (code == 4) | (code == 5):
            # ubinary (4) / binary (5): bit 7 of byte j is value 8j > 0 (numpy.packbits); binary flips the top bit
            # (the byte - 128 as int8). Values past k are zero, so their bits are clear.
            bits = tl.where(acc > 0.0, 128 >> (offs_h % 8), 0)
            packed = tl.sum(tl.reshape(bits, [BLOCK_H // 8, 8]), axis=1)
            packed = tl.where(code == 5, packed ^ 128, packed)
            j = tl.arange(0, BLOCK_H // 8)
            tl.store(out + j, packed.to(tl.uint8), mask=j < k // 8)


def pool_encode_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    encodings: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    total: int | None = None,
    ranges: torch.Tensor | None = None,
    range_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError("this is a bug: the triton pool_encode backend was chosen but triton is not installed")
    if mode not in MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; supported: {', '.join(MODES)}")
    T, H = hidden.shape
    B = cu_seqlens.shape[0] - 1
    dev = hidden.device
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    dims = dims.to(device=dev, dtype=torch.int32)
    encodings = encodings.to(device=dev, dtype=torch.int32)
    if offsets is None:
        offsets = _offsets(dims, encodings)
    if total is None:
        total = int(offsets[-1])  # one host sync: the buffer's size
    if ranges is None:  # no scalar-quantized row: a placeholder the kernel never reads
        ranges, range_rows = torch.zeros(1, 2, H, dtype=torch.float32, device=dev), torch.zeros_like(encodings)
    vectors = torch.empty(B, H, dtype=torch.float32, device=dev)
    out = torch.empty(max(total, 1), dtype=torch.uint8, device=dev)
    block_h = max(16, triton.next_power_of_2(H))  # tiny tiles are masked, never degenerate
    _pool_encode_kernel[(B,)](
        hidden, hidden.stride(0), cu_seqlens.to(device=dev, dtype=torch.int32), dims,
        normalize.to(device=dev, dtype=torch.int8), encodings, offsets,
        ranges.to(device=dev, dtype=torch.float32).contiguous(), range_rows.to(device=dev, dtype=torch.int32),
        vectors, vectors.view(torch.uint8), out, H,
        MODE=MODES[mode], BLOCK_H=block_h, BLOCK_T=max(1, min(16, 8192 // block_h)), BLOCK_G=256,
        num_warps=4 if block_h <= 1024 else 8,
    )
    return vectors, out[:total], offsets


def triton_available() -> bool:
    return triton is not None


def select_pool_backend(device: torch.device, requested: str = "auto") -> str:
    """auto: Triton on CUDA when installed, the torch twin otherwise. An explicit triton without triton fails."""
    if requested == "torch":
        choice = "torch"
    elif requested == "triton":
        if triton is None:
            raise ValueError("pool backend 'triton' requested but triton is not installed")
        choice = "triton"
    else:
        choice = "triton" if device.type == "cuda" and triton is not None else "torch"
    log.info("pool+encode backend: %s (%s)", choice, device.type)
    return choice


IMPLS = {"torch": pool_encode_torch, "triton": pool_encode_triton}

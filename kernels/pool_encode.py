"""Segment pooling + Matryoshka cut + L2 normalisation + little-endian float32 base64, in one launch.

``pool_encode(hidden [T, H], cu_seqlens [B+1], mode, dims [B], normalize [B], base64 [B], *, offsets, total)``
returns

- ``vectors [B, H]`` float32: row b pooled (mean / cls / last, fp32 accumulation), zeroed past ``dims[b]``,
  L2-normalised when ``normalize[b]``;
- ``b64 [N]`` uint8 and ``offsets [B+1]`` int64: the standard base64 (``=`` padded) of the first
  ``4 * dims[b]`` little-endian bytes of row b at ``b64[offsets[b]:offsets[b+1]]``, empty where
  ``base64[b]`` is false.

The caller may pass the base64 ``offsets [B+1]`` (on the device) and their ``total`` (on the host), computed on
the host where it already knows dims and the requests' formats; ``base64`` may then be None. Otherwise they
are computed here (the Triton launcher then reads ``total`` back from the device: one sync).

Two implementations with that one signature: :func:`pool_encode_torch`, the pure-torch twin (the CPU path
and the test oracle), and :func:`pool_encode_triton`, one Triton program per sequence (the CUDA path; runs
on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI checks it). The backend is chosen once at
start-up by :func:`select_pool_backend` and logged.
"""

from __future__ import annotations

import base64 as _base64
import logging
from typing import Sequence

import torch

from embedserve.kernels.pooling import finish, pool

log = logging.getLogger(__name__)

MODES = {"mean": 0, "cls": 1, "last": 2}

try:  # triton ships with CUDA builds of torch; a CPU install need not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def _b64_chars(dims):
    # Base64 of 4 * dims float32 bytes: 4 characters per 3 bytes, the last group padded.
    return 4 * ((4 * dims + 2) // 3)


def b64_lengths(dims: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Base64 characters for 4*dims bytes, 0 where not wanted. ``[B]`` int64."""
    return torch.where(want.bool(), _b64_chars(dims.long()), 0)


def b64_lengths_host(dims: Sequence[int], want: Sequence[bool]) -> list[int]:
    """:func:`b64_lengths` on host lists: what the runner computes the offsets from without asking the device."""
    return [_b64_chars(d) if w else 0 for d, w in zip(dims, want)]


def _offsets(dims: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    lengths = b64_lengths(dims, want)
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def pool_encode_torch(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    want_base64: torch.Tensor | None,
    *,
    offsets: torch.Tensor | None = None,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vectors = finish(pool(hidden, cu_seqlens, mode), dims, normalize.bool())
    if offsets is None:
        offsets = _offsets(dims, want_base64)
    bounds = offsets.tolist()
    rows = [i for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
    if not rows:
        return vectors, torch.empty(0, dtype=torch.uint8), offsets
    host = vectors.cpu().numpy().astype("<f4", copy=False)
    ks = dims.tolist()
    # One C-level b64encode per row: no Python loop over floats.
    encoded = b"".join(_base64.b64encode(host[i, : ks[i]].tobytes()) for i in rows)
    return vectors, torch.frombuffer(bytearray(encoded), dtype=torch.uint8), offsets


if triton is not None:

    @triton.jit
    def _b64_char(v):
        # 0-25 'A'.., 26-51 'a'.., 52-61 '0'.., 62 '+', 63 '/'
        return tl.where(v < 26, v + 65, tl.where(v < 52, v + 71, tl.where(v < 62, v - 4, tl.where(v == 62, 43, 47))))

    @triton.jit
    def _pool_encode_kernel(
        hidden_ptr, stride_t, cu_ptr, dims_ptr, norm_ptr, off_ptr,
        vec_ptr, vec_bytes_ptr, b64_ptr, H,
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

        o0 = tl.load(off_ptr + b)
        o1 = tl.load(off_ptr + b + 1)
        if o1 > o0:
            # The row's bytes are read back from where they were just stored: make the stores visible
            # to every thread of this program first.
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
                out = b64_ptr + o0 + 4 * g
                tl.store(out, c0.to(tl.uint8), mask=live)
                tl.store(out + 1, c1.to(tl.uint8), mask=live)
                tl.store(out + 2, c2.to(tl.uint8), mask=live)
                tl.store(out + 3, c3.to(tl.uint8), mask=live)


def pool_encode_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str,
    dims: torch.Tensor,
    normalize: torch.Tensor,
    want_base64: torch.Tensor | None,
    *,
    offsets: torch.Tensor | None = None,
    total: int | None = None,
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
    if offsets is None:
        offsets = _offsets(dims, want_base64.to(dev))
    if total is None:
        total = int(offsets[-1])  # one host sync: the buffer's size
    vectors = torch.empty(B, H, dtype=torch.float32, device=dev)
    b64 = torch.empty(max(total, 1), dtype=torch.uint8, device=dev)
    block_h = max(16, triton.next_power_of_2(H))  # tiny tiles are masked, never degenerate
    _pool_encode_kernel[(B,)](
        hidden, hidden.stride(0), cu_seqlens.to(device=dev, dtype=torch.int32), dims,
        normalize.to(device=dev, dtype=torch.int8), offsets,
        vectors, vectors.view(torch.uint8), b64, H,
        MODE=MODES[mode], BLOCK_H=block_h, BLOCK_T=max(1, min(16, 8192 // block_h)), BLOCK_G=256,
        num_warps=4 if block_h <= 1024 else 8,
    )
    return vectors, b64[:total], offsets


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

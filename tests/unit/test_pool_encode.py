"""The fused pool+encode Triton kernel against its pure-torch twin and Python's base64: interpreted on CPU tensors,
compiled on CUDA ones (EMBEDSERVE_TEST_DEVICE=cuda)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from embedserve.kernels.pool_encode import (
    b64_lengths,
    pool_encode_torch,
    pool_encode_triton,
    select_pool_backend,
    triton_available,
)

from on_device import DEVICE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="triton is not installed")]

LENGTHS = {"short": [1, 2, 3, 1, 7], "long": [1, 4096, 2, 3]}


def check(hidden, lengths, mode, dims, normalize, want):
    hidden = hidden.to(DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    dims, normalize, want = (torch.tensor(x, device=DEVICE) for x in (dims, normalize, want))
    vec, b64, off = pool_encode_triton(hidden, cu, mode, dims, normalize, want)
    ref_vec, ref_b64, ref_off = pool_encode_torch(hidden, cu, mode, dims, normalize, want)
    vec, b64, off, ref_vec, ref_off, dims, want = (t.cpu() for t in (vec, b64, off, ref_vec, ref_off, dims, want))
    tol = 1e-6 if hidden.dtype == torch.float32 else 1e-5
    torch.testing.assert_close(vec, ref_vec, atol=tol, rtol=tol)
    assert torch.equal(off, ref_off)
    assert off[-1] == b64.numel() == int(b64_lengths(dims, want).sum())
    buf = bytes(b64.numpy())
    for i, k in enumerate(dims.tolist()):
        got = buf[off[i] : off[i + 1]]
        if not want[i]:
            assert got == b""
            continue
        # Byte-identical to Python's base64 of the kernel's own vector, and that vector is the twin's.
        assert got == base64.b64encode(np.asarray(vec[i, :k], "<f4").tobytes())
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(got), "<f4"), ref_vec[i, :k].numpy(), atol=tol)
        assert (vec[i, k:] == 0).all()


@pytest.mark.parametrize("H", [1, 3, 384, 1000, 1024, 4096])
@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_twin_short_segments(H, mode, dtype):
    torch.manual_seed(H)
    lengths = LENGTHS["short"]
    hidden = torch.randn(sum(lengths), H).to(dtype)
    n = len(lengths)
    dims = [H, max(1, H - 1), max(1, H // 3), 1, max(1, H - 2)]  # k = H and k < H, every k % 3
    check(hidden, lengths, mode, dims, [1, 0, 1, 1, 0], [1, 1, 1, 0, 1][:n])


@pytest.mark.parametrize("H", [3, 384, 1024])
@pytest.mark.parametrize("mode", ["mean", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_twin_with_a_segment_of_4096(H, mode, dtype):
    torch.manual_seed(1)
    lengths = LENGTHS["long"]
    hidden = torch.randn(sum(lengths), H).to(dtype)
    check(hidden, lengths, mode, [H, H - 1, 2, max(1, H // 2)], [1, 1, 0, 1], [1, 1, 1, 1])


def test_wide_hidden_with_a_long_segment():
    torch.manual_seed(2)
    lengths = [4096, 1]
    hidden = torch.randn(sum(lengths), 4096, dtype=torch.bfloat16)
    check(hidden, lengths, "mean", [4096, 1000], [1, 1], [1, 1])


def test_strided_hidden_and_no_base64_rows():
    hidden = torch.randn(10, 20)[:, :16]  # row stride 20, not 16
    check(hidden, [4, 6], "mean", [16, 8], [1, 0], [0, 0])


def test_offsets_computed_on_the_host_as_the_runner_passes_them():
    """int32 base64 offsets and their total given by the caller (the runner computes them on the host, so the
    launch never reads the device) give the rows and bytes the kernel computes by itself."""
    torch.manual_seed(3)
    lengths = [3, 1, 9]
    hidden = torch.randn(sum(lengths), 24).to(DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    dims = torch.tensor([24, 7, 1], dtype=torch.int32, device=DEVICE)
    norm = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    chars = [4 * ((4 * d + 2) // 3) for d in (24, 7)] + [0]
    offsets = torch.tensor([0, chars[0], chars[0] + chars[1], sum(chars)], dtype=torch.int32, device=DEVICE)
    vec, b64, _ = pool_encode_triton(hidden, cu, "mean", dims, norm, None, offsets=offsets, total=sum(chars))
    ref, _, _ = pool_encode_torch(hidden, cu, "mean", dims, norm, None, offsets=offsets, total=sum(chars))
    torch.testing.assert_close(vec.cpu(), ref.cpu(), atol=1e-6, rtol=1e-6)
    text = bytes(b64.cpu().numpy())
    assert text[: chars[0]] == base64.b64encode(np.asarray(vec[0].cpu(), "<f4").tobytes())
    assert text[chars[0] :] == base64.b64encode(np.asarray(vec[1, :7].cpu(), "<f4").tobytes())


def test_backend_choice_is_logged(caplog):
    caplog.set_level("INFO")
    assert select_pool_backend(torch.device("cpu")) == "torch"
    assert select_pool_backend(torch.device("cpu"), "triton") == "triton"
    assert "pool+encode backend: triton" in caplog.text

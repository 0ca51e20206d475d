"""The fused pool+encode Triton kernel against its pure-torch twin and Python's base64: interpreted on CPU tensors,
compiled on CUDA ones (EMBEDSERVE_TEST_DEVICE=cuda)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from embedserve.kernels.pool_encode import (
    ENCODINGS,
    encoded_lengths,
    pool_encode_torch,
    pool_encode_triton,
    select_pool_backend,
    triton_available,
)
from embedserve.kernels.quantize import quantize

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
    assert off[-1] == b64.numel() == int(encoded_lengths(dims, want).sum())
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
    """int32 offsets and their total given by the caller (the runner computes them on the host, so the
    launch never reads the device) give the rows and bytes the kernel computes by itself."""
    torch.manual_seed(3)
    lengths = [3, 1, 9]
    hidden = torch.randn(sum(lengths), 24).to(DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    dims = torch.tensor([24, 7, 1], dtype=torch.int32, device=DEVICE)
    norm = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    chars = [4 * ((4 * d + 2) // 3) for d in (24, 7)] + [0]
    offsets = torch.tensor([0, chars[0], chars[0] + chars[1], sum(chars)], dtype=torch.int32, device=DEVICE)
    codes = torch.tensor([1, 1, 0], dtype=torch.int32, device=DEVICE)
    vec, b64, _ = pool_encode_triton(hidden, cu, "mean", dims, norm, codes, offsets=offsets, total=sum(chars))
    ref, _, _ = pool_encode_torch(hidden, cu, "mean", dims, norm, codes, offsets=offsets, total=sum(chars))
    torch.testing.assert_close(vec.cpu(), ref.cpu(), atol=1e-6, rtol=1e-6)
    text = bytes(b64.cpu().numpy())
    assert text[: chars[0]] == base64.b64encode(np.asarray(vec[0].cpu(), "<f4").tobytes())
    assert text[chars[0] :] == base64.b64encode(np.asarray(vec[1, :7].cpu(), "<f4").tobytes())


def run_both(hidden, lengths, mode, dims, normalize, codes, ranges, range_rows):
    """Both implementations on one step: (kernel vectors, kernel rows' bytes, twin rows' bytes)."""
    hidden = hidden.to(DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    args = [torch.tensor(x, device=DEVICE) for x in (dims, normalize, codes)]
    extra = dict(ranges=ranges.to(DEVICE), range_rows=torch.tensor(range_rows, dtype=torch.int32, device=DEVICE))
    vec, out, off = pool_encode_triton(hidden, cu, mode, *args, **extra)
    ref_vec, ref_out, ref_off = pool_encode_torch(hidden, cu, mode, *args, **extra)
    assert torch.equal(off.cpu(), ref_off.cpu())
    bounds = off.tolist()
    rows = [bytes(out.cpu().numpy())[bounds[i] : bounds[i + 1]] for i in range(len(dims))]
    ref_rows = [bytes(ref_out.cpu().numpy())[bounds[i] : bounds[i + 1]] for i in range(len(dims))]
    return vec.cpu(), rows, ref_rows


def test_integer_types_at_the_range_edges_round_half_to_even_and_clip():
    """Values crafted on the grid's edges (CLS rows, no normalisation: the row is the values): ties round to even,
    values outside the range clip to 0 / 255 (never wrap), a dimension with an empty range takes a step of 1. The
    expectation is computed independently with numpy; both implementations must give exactly its bytes."""
    H = 19  # an awkward width: a masked tile, not a multiple of 8
    values = torch.tensor([2.5, 3.5, -1.0, 300.0, 255.0, 0.0, 254.5, 0.5, 1.5, -0.5, 255.5, 127.5, 128.5,
                           1e9, -1e9, 7.0, 7.0, 3.25, 4.75])
    ranges = torch.zeros(2, 2, H)
    ranges[0, 1] = 255.0  # set 0: lo 0, hi 255 everywhere: a step of exactly 1
    ranges[0, 1, 15:17] = 0.0  # ... except two dimensions whose range is empty: step 1 from lo
    ranges[1, 0], ranges[1, 1] = -2.0, 2.0  # set 1: a step of 4 / 255
    hidden = torch.stack([values, values, values, values + 0.0])
    lengths, dims = [1, 1, 1, 1], [H, H, H, 11]
    codes = [ENCODINGS["uint8"], ENCODINGS["int8"], ENCODINGS["uint8"], ENCODINGS["int8"]]
    vec, rows, ref_rows = run_both(hidden, lengths, "cls", dims, [0, 0, 0, 0], codes, ranges, [0, 0, 1, 0])
    assert rows == ref_rows
    for i, (k, code, r) in enumerate(zip(dims, codes, [0, 0, 1, 0])):
        v, lo, hi = values[:k].double().numpy(), ranges[r, 0, :k].numpy(), ranges[r, 1, :k].numpy()
        step = ((hi - lo) / np.float32(255)).astype(np.float32)
        step[step == 0] = 1
        level = np.clip(np.round((v.astype(np.float32) - lo) / step), 0, 255).astype(np.int16)
        want = level.astype(np.uint8) if code == ENCODINGS["uint8"] else (level - 128).astype(np.int8)
        assert rows[i] == want.tobytes(), (i, np.frombuffer(rows[i], want.dtype), want)
    assert list(rows[0][:7]) == [2, 4, 0, 255, 255, 0, 254]  # the ties 2.5 -> 2, 3.5 -> 4, 254.5 -> 254


@pytest.mark.parametrize("H", [8, 24, 384, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_encoding_in_one_step_matches_the_twin_and_the_quantize_rules(H, dtype):
    """One step mixing every encoding (none, base64, uint8, int8, ubinary, binary) at awkward widths, two range
    sets, normalised and not: the kernel's bytes equal the twin's, and each row's bytes are
    :func:`quantize` of the kernel's own float row (itself tested against sentence-transformers)."""
    torch.manual_seed(H)
    lengths = [3, 1, 5, 2, 4, 1, 6, 2]
    hidden = torch.randn(sum(lengths), H).to(dtype)
    calib = torch.randn(64, H)
    ranges = torch.stack([torch.stack([calib.amin(0), calib.amax(0)]),
                          torch.stack([calib.amin(0) / 4, calib.amax(0) / 4])])  # the second set clips more
    eights = [max(8, H - 8 * j) for j in range(3)]
    dims = [H, max(1, H - 3), H, max(1, H // 3), eights[0], eights[1], eights[2], max(1, H - 1)]
    names = [None, "base64", "uint8", "int8", "ubinary", "binary", "ubinary", "uint8"]
    codes = [ENCODINGS.get(n, 0) for n in names]
    norm = [1, 0, 1, 0, 1, 1, 0, 0]
    which = [0, 0, 0, 1, 0, 0, 0, 1]
    vec, rows, ref_rows = run_both(hidden, lengths, "mean", dims, norm, codes, ranges, which)
    assert rows == ref_rows
    for i, (k, name, r) in enumerate(zip(dims, names, which)):
        if name is None:
            assert rows[i] == b""
        elif name == "base64":
            assert rows[i] == base64.b64encode(np.asarray(vec[i, :k], "<f4").tobytes())
        else:
            want = quantize(vec[i : i + 1, :k], name, ranges[r, :, :k])
            assert rows[i] == want.numpy().tobytes(), (i, name)


def test_backend_choice_is_logged(caplog):
    caplog.set_level("INFO")
    assert select_pool_backend(torch.device("cpu")) == "torch"
    assert select_pool_backend(torch.device("cpu"), "triton") == "triton"
    assert "pool+encode backend: triton" in caplog.text

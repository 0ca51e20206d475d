"""The pure-torch pooling twin against per-sequence loops in fp64."""

from __future__ import annotations

import pytest
import torch

from embedserve.kernels.pooling import finish, pool


def per_sequence(hidden, lengths, mode):
    out, start = [], 0
    for n in lengths:
        seg = hidden[start : start + n].double()
        out.append({"mean": seg.mean(0), "cls": seg[0], "last": seg[-1]}[mode])
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pool_matches_loop(mode, dtype):
    torch.manual_seed(0)
    lengths = [1, 2, 3, 300, 1, 4096]
    hidden = torch.randn(sum(lengths), 1000).to(dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    got = pool(hidden, cu, mode)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), 1000)
    torch.testing.assert_close(got.double(), per_sequence(hidden, lengths, mode), atol=1e-5, rtol=1e-5)


def test_unknown_mode_names_the_supported_ones():
    with pytest.raises(ValueError, match="mean, cls, last"):
        pool(torch.zeros(2, 3), torch.tensor([0, 2], dtype=torch.int32), "max")


def test_finish_truncates_and_normalises_per_row():
    torch.manual_seed(0)
    v = torch.randn(3, 8)
    out = finish(v, torch.tensor([8, 3, 5]), torch.tensor([True, True, False]))
    torch.testing.assert_close(out[0], v[0] / v[0].norm())
    torch.testing.assert_close(out[1, :3], v[1, :3] / v[1, :3].norm())
    torch.testing.assert_close(out[2, :5], v[2, :5])
    assert out[1, 3:].abs().sum() == 0


def test_finish_zero_vector_stays_finite():
    out = finish(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([True]))
    assert torch.isfinite(out).all()

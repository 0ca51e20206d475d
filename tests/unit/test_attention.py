"""Every varlen attention backend available here against the dense block-diagonal reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedserve.kernels.attention import BACKENDS, _available_backends, prepare, select_backend, varlen_attention

CPU = torch.device("cpu")
BACKENDS_HERE = [b for b in _available_backends(CPU) if b != "dense"]


def reference(q, k, v, lengths, causal, window=None):
    """Each sequence alone, in fp32, with an explicit mask: the plainest possible definition."""
    outs, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        keep = torch.ones(n, n, dtype=torch.bool)
        if causal:
            keep &= torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:  # transformers' sliding_window: distance < window
            pos = torch.arange(n)
            keep &= (pos[:, None] - pos[None, :]).abs() < window
        scores = scores.masked_fill(~keep, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


LENGTH_SETS = {
    "ones": [1, 1, 1],
    "mixed": [1, 2, 3, 17, 64, 5, 300, 1, 128],
    "equal": [16, 16, 16, 16],
    "single_long": [700],
}


@pytest.mark.parametrize("backend", BACKENDS_HERE + ["dense"])
@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_backend_matches_reference(backend, lengths, causal, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    T, D = sum(lengths), 24
    q, k, v = torch.randn(T, hq, D), torch.randn(T, hkv, D), torch.randn(T, hkv, D)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = varlen_attention(q, k, v, prepare(backend, cu, max(lengths), causal=causal))
    torch.testing.assert_close(out, reference(q, k, v, lengths, causal), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS_HERE + ["dense"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 50])
def test_sliding_window_matches_reference(backend, causal, window):
    torch.manual_seed(2)
    lengths = LENGTH_SETS["mixed"]
    T = sum(lengths)
    q, k, v = torch.randn(T, 6, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = varlen_attention(q, k, v, prepare(backend, cu, max(lengths), causal=causal, window=window))
    torch.testing.assert_close(out, reference(q, k, v, lengths, causal, window), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(backend, dtype):
    torch.manual_seed(1)
    lengths = [3, 40, 1, 90]
    T = sum(lengths)
    q, k, v = (torch.randn(T, 4, 32) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), prepare(backend, cu, 90))
    assert out.dtype == dtype
    ref = reference(q, k, v, lengths, False)
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.999


def test_auto_choice_is_logged_and_explicit_unavailable_is_an_error(caplog):
    caplog.set_level("INFO")
    assert select_backend(CPU) == "sdpa_bucketed"
    assert "sdpa_bucketed" in caplog.text
    with pytest.raises(ValueError, match="not available on cpu"):
        select_backend(CPU, "torch_varlen")
    assert set(BACKENDS) >= set(_available_backends(CPU))

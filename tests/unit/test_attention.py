"""Every varlen attention backend available here against the dense block-diagonal reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedserve.kernels.attention import BACKENDS, _available_backends, prepare, select_backend, varlen_attention

CPU = torch.device("cpu")
BACKENDS_HERE = [b for b in _available_backends(CPU) if b != "dense"]


def reference(q, k, v, lengths, causal, window=None, k_lengths=None):
    """Each sequence alone, in fp32, with an explicit mask: the plainest possible definition.
    With ``k_lengths``, sequence i's queries are the last ``lengths[i]`` of its ``k_lengths[i]`` positions."""
    outs, start, k_start = [], 0, 0
    rep = q.shape[1] // k.shape[1]
    for i, n in enumerate(lengths):
        nk = n if k_lengths is None else k_lengths[i]
        qs = q[start : start + n].float().transpose(0, 1)
        ks, vs = (t[k_start : k_start + nk].float().transpose(0, 1) for t in (k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        q_pos, k_pos = torch.arange(nk - n, nk)[:, None], torch.arange(nk)[None, :]
        keep = torch.ones(n, nk, dtype=torch.bool)
        if causal:
            keep &= k_pos <= q_pos
        if window is not None:  # transformers' sliding_window: distance < window
            keep &= (q_pos - k_pos).abs() < window
        scores = scores.masked_fill(~keep, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
        k_start += nk
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


@pytest.mark.parametrize("backend", BACKENDS_HERE + ["dense"])
@pytest.mark.parametrize("window", [None, 40])
def test_chunks_attending_to_cached_keys(backend, window):
    """cu_seqlens_q != cu_seqlens_k: some sequences are chunks whose keys include earlier, cached tokens."""
    torch.manual_seed(3)
    lengths = [5, 64, 1, 100, 7]  # queries
    k_lengths = [5, 300, 1, 357, 7]  # keys: sequences 1 and 3 carry a cached prefix
    q = torch.randn(sum(lengths), 6, 16)
    k, v = torch.randn(sum(k_lengths), 2, 16), torch.randn(sum(k_lengths), 2, 16)
    cu_q = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + k_lengths).cumsum(0).to(torch.int32)
    batch = prepare(backend, cu_q, max(lengths), causal=True, window=window, cu_seqlens_k=cu_k,
                    max_seqlen_k=max(k_lengths))
    out = varlen_attention(q, k, v, batch)
    want = reference(q, k, v, lengths, True, window, k_lengths)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


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

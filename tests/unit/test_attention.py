"""Varlen attention: every backend usable on the test device against a plain per-sequence reference, the
backend chosen for each torch signature and model shape, and the adapter around each varlen_attn signature."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from embedserve.kernels import attention
from embedserve.kernels.attention import (
    BACKENDS,
    backend_problems,
    AttentionShape,
    VarlenCaps,
    choose_backend,
    flash_attn_works,
    prepare,
    select_backend,
    usable_backends,
    varlen_attention,
)
from on_device import DEVICE, ON_CUDA, assert_close

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")
HALF = [torch.bfloat16, torch.float16]
# Backends as listed for the most demanding shape (GQA, windows, chunks): a (backend, case) pair that a given
# torch cannot run is skipped at run time with the reason.
ANY_SHAPE = AttentionShape(heads=6, kv_heads=2, head_dim=16, causal=True, window=True, chunked=True)
FP32_BACKENDS = usable_backends(DEVICE, torch.float32, ANY_SHAPE)
HALF_BACKENDS = [
    b for b in BACKENDS
    if any(b in usable_backends(DEVICE, dt, s) for dt in HALF for s in (ANY_SHAPE, replace(ANY_SHAPE, window=False)))
]


def reference(q, k, v, lengths, causal, window=None, k_lengths=None, scale=None, bias_by_distance=None):
    """Each sequence alone, in fp32, with an explicit mask: the plainest possible definition.
    With ``k_lengths``, sequence i's queries are the last ``lengths[i]`` of its ``k_lengths[i]`` positions.
    ``bias_by_distance(key minus query [n, nk]) -> [H, n, nk]``: an additive score bias."""
    outs, start, k_start = [], 0, 0
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for i, n in enumerate(lengths):
        nk = n if k_lengths is None else k_lengths[i]
        qs = q[start : start + n].float().cpu().transpose(0, 1)
        ks, vs = (t[k_start : k_start + nk].float().cpu().transpose(0, 1) for t in (k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        q_pos, k_pos = torch.arange(nk - n, nk)[:, None], torch.arange(nk)[None, :]
        keep = torch.ones(n, nk, dtype=torch.bool)
        if causal:
            keep &= k_pos <= q_pos
        if window is not None:  # transformers' sliding_window: distance < window
            keep &= (q_pos - k_pos).abs() < window
        if bias_by_distance is not None:
            scores = scores + bias_by_distance(k_pos - q_pos)
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


def cu(lengths):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)


def skip_unless_usable(backend, dtype, shape):
    if backend not in usable_backends(DEVICE, dtype, shape):
        pytest.skip(f"{backend} cannot run {shape.describe()} in {dtype} here")


@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_backend_matches_reference(backend, lengths, causal, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    T, D = sum(lengths), 24
    q, k, v = (torch.randn(T, h, D, device=DEVICE) for h in (hq, hkv, hkv))
    out = varlen_attention(q, k, v, prepare(backend, cu(lengths), max(lengths), causal=causal))
    assert_close(out, reference(q, k, v, lengths, causal), torch.float32)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 50])
def test_sliding_window_matches_reference(backend, causal, window):
    torch.manual_seed(2)
    lengths = LENGTH_SETS["mixed"]
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, 16, device=DEVICE) for h in (6, 2, 2))
    out = varlen_attention(q, k, v, prepare(backend, cu(lengths), max(lengths), causal=causal, window=window))
    assert_close(out, reference(q, k, v, lengths, causal, window), torch.float32)


@pytest.mark.parametrize("backend", usable_backends(DEVICE, torch.float32, replace(ANY_SHAPE, relative_bias=True)))
@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
@pytest.mark.parametrize("window", [None, 4])
def test_relative_position_bias_matches_reference(backend, lengths, window):
    """MPNet's additive bias by distance (key minus query), on every backend that can take it, alone and with
    a window; padded bucket slots and other sequences stay masked."""
    torch.manual_seed(4)
    T, H, M = sum(lengths), 4, max(lengths)
    q, k, v = (torch.randn(T, H, 16, device=DEVICE) for _ in range(3))
    per_distance = torch.randn(H, 2 * M - 1, device=DEVICE) * 3  # column d + M - 1 for distance d
    batch = prepare(backend, cu(lengths), M, window=window, rel_bias=per_distance)
    out = varlen_attention(q, k, v, batch)
    want = reference(q, k, v, lengths, False, window, bias_by_distance=lambda d: per_distance.cpu()[:, d + M - 1])
    assert_close(out, want, torch.float32)
    if M > 1:  # the bias took effect (a single token attends to itself whatever its bias)
        unbiased = varlen_attention(q, k, v, prepare(backend, cu(lengths), M, window=window))
        assert (out - unbiased).abs().max() > 1e-2


def test_flash_backends_refuse_a_relative_bias_and_say_why():
    problems = backend_problems("cuda", torch.bfloat16, replace(ANY_SHAPE, relative_bias=True),
                                caps=VarlenCaps(True, True, True, True, True), flash_attn=None)
    for name in ("torch_varlen", "flash_attn"):
        assert "relative position buckets" in problems[name]
    assert problems["sdpa_bucketed"] is None


CHUNK_Q = [5, 64, 1, 100, 7]  # queries
CHUNK_K = [5, 300, 1, 357, 7]  # keys: sequences 1 and 3 carry a cached prefix


@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("window", [None, 40])
def test_chunks_attending_to_cached_keys(backend, window):
    """cu_seqlens_q != cu_seqlens_k: some sequences are chunks whose keys include earlier, cached tokens."""
    torch.manual_seed(3)
    q = torch.randn(sum(CHUNK_Q), 6, 16, device=DEVICE)
    k, v = (torch.randn(sum(CHUNK_K), 2, 16, device=DEVICE) for _ in range(2))
    batch = prepare(backend, cu(CHUNK_Q), max(CHUNK_Q), causal=True, window=window, cu_seqlens_k=cu(CHUNK_K),
                    max_seqlen_k=max(CHUNK_K), lengths=CHUNK_Q, k_lengths=CHUNK_K)
    out = varlen_attention(q, k, v, batch)
    assert_close(out, reference(q, k, v, CHUNK_Q, True, window, CHUNK_K), torch.float32)


@pytest.mark.parametrize("backend", FP32_BACKENDS)
@pytest.mark.parametrize("window", [None, 40])
def test_hidden_tails_are_read_by_nobody_and_read_their_sequence(backend, window):
    """A ColBERT query's hidden expansion: each sequence's last ``tails[i]`` tokens attend to its other tokens
    but are keys to none (not even to themselves), as transformers' attention mask of 0 on them makes it. A
    window (40) wider than every tailed sequence cuts nothing from them and still cuts the long one."""
    torch.manual_seed(4)
    lengths, tails = [12, 3, 300, 9, 1, 32], [7, 0, 0, 1, 0, 20]
    q, k, v = (torch.randn(sum(lengths), 4, 16, device=DEVICE) for _ in range(3))
    batch = prepare(backend, cu(lengths), max(lengths), window=window, lengths=lengths, tails=tails)
    out = varlen_attention(q, k, v, batch)
    want, start = [], 0
    for n, t in zip(lengths, tails):
        rows = slice(start, start + n)
        keys = slice(start, start + n - t)
        w = window if n > (window or n) else None
        q_pos, k_pos = torch.arange(n)[:, None], torch.arange(n - t)[None, :]
        scores = (q[rows].float().cpu().transpose(0, 1) @ k[keys].float().cpu().transpose(0, 1).transpose(1, 2)
                  * 16 ** -0.5)
        if w is not None:
            scores = scores.masked_fill((q_pos - k_pos).abs() >= w, float("-inf"))
        want.append((scores.softmax(-1) @ v[keys].float().cpu().transpose(0, 1)).transpose(0, 1))
        start += n
    assert_close(out, torch.cat(want), torch.float32)


CASES = {  # (heads, kv_heads, head_dim, causal, window, chunked)
    "mha": (4, 4, 32, False, None, False),
    "gqa_causal": (6, 2, 16, True, None, False),
    "window": (6, 2, 16, True, 24, False),
    "window_bidirectional": (4, 4, 64, False, 24, False),
    "chunk": (6, 2, 16, True, None, True),
    "odd_head_dim": (6, 6, 12, False, None, False),
}


@pytest.mark.parametrize("backend", HALF_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_half_precision_backends_match_reference(backend, dtype, case):
    """Every backend usable in half precision on the test device (on CUDA the flash ones), each model shape."""
    hq, hkv, D, causal, window, chunked = case
    shape = AttentionShape(hq, hkv, D, causal=causal, window=window is not None, chunked=chunked)
    skip_unless_usable(backend, dtype, shape)
    torch.manual_seed(4)
    lengths = [3, 40, 1, 90, 17]
    k_lengths = [n + (200 if i % 2 else 0) for i, n in enumerate(lengths)] if chunked else lengths
    q = torch.randn(sum(lengths), hq, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(sum(k_lengths), hkv, D, device=DEVICE).to(dtype) for _ in range(2))
    kw = dict(cu_seqlens_k=cu(k_lengths), max_seqlen_k=max(k_lengths), k_lengths=k_lengths) if chunked else {}
    batch = prepare(backend, cu(lengths), max(lengths), causal=causal, window=window, lengths=lengths, **kw)
    scale = 0.7 / D**0.5  # not the default: Gemma's query_pre_attn_scalar
    out = varlen_attention(q, k, v, batch, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    want = reference(q, k, v, lengths, causal, window, k_lengths if chunked else None, scale)
    assert_close(out, want, dtype)


# -- the choice -------------------------------------------------------------------------------------------------

# What varlen_attn took in each torch release (read from each release's torch/nn/attention/varlen.py).
SIGNATURES = {
    "2.9": VarlenCaps.from_params(None),
    "2.10": VarlenCaps.from_params({"is_causal", "return_aux"}),
    "2.11": VarlenCaps.from_params({"return_aux", "scale", "window_size"}),
    "2.12+": VarlenCaps.from_params(
        {"return_aux", "scale", "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"}
    ),
}
SHAPES = {
    "MHA": AttentionShape(12, 12, 64),
    "GQA": AttentionShape(16, 8, 128, causal=True),
    "window": AttentionShape(16, 8, 128, causal=True, window=True),
    "chunk": AttentionShape(16, 8, 128, causal=True, chunked=True),
}
NO_FLASH_ATTN = "flash_attn does not import (ImportError)"
V, S = "torch_varlen", "sdpa_bucketed"
# On CUDA in fp16/bf16, without the flash_attn package: signature -> backend per shape (MHA, GQA, window, chunk).
# GQA on a torch without enable_gqa expands K/V; only windows need 2.11's window_size.
TABLE = {
    "2.9": (S, S, S, S),
    "2.10": (V, V, S, V),
    "2.11": (V, V, V, V),
    "2.12+": (V, V, V, V),
}


@pytest.mark.parametrize("sig", SIGNATURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_backend_table(sig, shape, dtype):
    caps, s = SIGNATURES[sig], SHAPES[shape]
    cuda = choose_backend("cuda", dtype, s, caps=caps, flash_attn=NO_FLASH_ATTN)
    want = TABLE[sig][list(SHAPES).index(shape)] if dtype != torch.float32 else S  # flash kernels: half only
    assert cuda == want
    # With a working flash_attn package it takes over where torch's own kernel cannot.
    with_fa = choose_backend("cuda", dtype, s, caps=caps, flash_attn=None)
    assert with_fa == (want if want == V else ("flash_attn" if dtype != torch.float32 else S))
    assert choose_backend("cpu", dtype, s, caps=caps, flash_attn=NO_FLASH_ATTN) == S


def test_an_explicit_unusable_choice_is_an_error_that_says_why():
    v210, v212 = SIGNATURES["2.10"], SIGNATURES["2.12+"]
    cases = [
        ("cuda", torch.bfloat16, SHAPES["window"], "torch_varlen", v210, "takes no window_size"),
        ("cuda", torch.float32, SHAPES["MHA"], "torch_varlen", v212, "float16/bfloat16, not float32"),
        ("cpu", torch.bfloat16, SHAPES["MHA"], "torch_varlen", v212, "CUDA only"),
        ("cuda", torch.bfloat16, SHAPES["MHA"], "torch_varlen", SIGNATURES["2.9"], "no torch.nn.attention.varlen"),
        ("cuda", torch.bfloat16, SHAPES["GQA"], "flash_attn", v212, "does not import"),
        ("cuda", torch.bfloat16, AttentionShape(2, 2, 512), "torch_varlen", v212, "head dims up to 256"),
    ]
    for device, dtype, shape, requested, caps, why in cases:
        with pytest.raises(ValueError, match=why) as err:
            choose_backend(device, dtype, shape, requested, caps=caps, flash_attn=NO_FLASH_ATTN)
        assert "Usable here:" in str(err.value) and "sdpa_bucketed" in str(err.value)
    assert choose_backend("cuda", torch.bfloat16, SHAPES["GQA"], "sdpa", caps=v210, flash_attn=None) == S
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose_backend("cpu", torch.float32, SHAPES["MHA"], "xformers", caps=v212, flash_attn=None)


def test_the_choice_is_logged_with_the_reasons(caplog):
    caplog.set_level("INFO")
    assert select_backend(CPU, "auto", torch.float32, SHAPES["GQA"]) == S
    assert "sdpa_bucketed for causal, GQA, 16 heads of 128 on cpu" in caplog.text
    assert "not torch_varlen: flash kernels run on CUDA only" in caplog.text
    with pytest.raises(ValueError, match="cannot serve this model"):
        select_backend(CPU, "torch_varlen")


def test_flash_attn_counts_only_if_it_imports_and_runs(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_flash(name, *args, **kw):
        if name == "flash_attn":
            raise ImportError("No module named 'flash_attn'")
        return real_import(name, *args, **kw)

    flash_attn_works.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_flash)
    try:
        assert "does not import" in flash_attn_works(0)
    finally:
        flash_attn_works.cache_clear()


# -- the adapter around each varlen_attn signature ---------------------------------------------------------------


def fake_varlen_attn(caps: VarlenCaps, calls: list):
    """A stand-in for torch's varlen_attn with a given release's signature and flash-attention's semantics
    (bottom-right causal, window (left, right), GQA only when enabled, default scale 1/sqrt(D))."""

    def call(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        allowed = {"return_aux"} | {n for n, on in (("scale", caps.scale), ("window_size", caps.window),
                                                   ("enable_gqa", caps.gqa), ("num_splits", caps.num_splits)) if on}
        if not caps.window:
            allowed.add("is_causal")
        assert set(kw) <= allowed, f"{set(kw) - allowed} is not a parameter of this signature"
        calls.append(kw)
        if q.shape[1] != k.shape[1]:
            assert kw.get("enable_gqa"), "Hq != Hkv without enable_gqa"
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        k_lengths = (cu_k[1:] - cu_k[:-1]).tolist()
        left, right = kw.get("window_size", (-1, 0) if kw.get("is_causal") else (-1, -1))
        window = None if left < 0 else left + 1
        assert right in (0, left), "only causal or symmetric windows are asked for"
        return reference(q, k, v, lengths, right == 0, window, k_lengths, kw.get("scale")).to(q.dtype)

    return call


@pytest.mark.parametrize("sig", ["2.10", "2.11", "2.12+"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_varlen_signature_is_called_the_way_it_understands(monkeypatch, sig, case):
    """On the CPU, with a stand-in: GQA expanded where enable_gqa is missing, the scale folded into q where
    `scale` is missing, windows and causal in each signature's terms, num_splits=1 where it exists."""
    from torch.nn.attention import varlen as torch_varlen_module  # noqa: F401 - present since 2.10

    caps = SIGNATURES[sig]
    hq, hkv, D, causal, window, chunked = case
    shape = AttentionShape(hq, hkv, D, causal=causal, window=window is not None, chunked=chunked)
    if choose_backend("cuda", torch.bfloat16, shape, caps=caps, flash_attn=NO_FLASH_ATTN) != "torch_varlen":
        pytest.skip(f"torch {sig} does not run {shape.describe()} with varlen_attn")
    calls: list = []
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", fake_varlen_attn(caps, calls))
    monkeypatch.setattr(attention, "torch_varlen_caps", lambda: caps)
    torch.manual_seed(5)
    lengths = [3, 40, 1, 90]
    k_lengths = [n + 50 * (i % 2) for i, n in enumerate(lengths)] if chunked else lengths
    q = torch.randn(sum(lengths), hq, D)
    k, v = torch.randn(sum(k_lengths), hkv, D), torch.randn(sum(k_lengths), hkv, D)
    cu_q = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    kw = dict(cu_seqlens_k=torch.tensor([0] + k_lengths).cumsum(0).to(torch.int32), max_seqlen_k=max(k_lengths))
    batch = prepare("torch_varlen", cu_q, max(lengths), causal=causal, window=window, **(kw if chunked else {}))
    scale = 0.7 / D**0.5
    out = varlen_attention(q, k, v, batch, scale=scale)
    assert_close(out, reference(q, k, v, lengths, causal, window, k_lengths if chunked else None, scale),
                 torch.float32)
    (called,) = calls
    assert called.get("num_splits") == (1 if caps.num_splits else None)


# -- CUDA only ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_CUDA, reason="needs a GPU: EMBEDSERVE_TEST_DEVICE=cuda")
def test_sdpa_on_cuda_never_needs_the_math_kernel():
    """SDPA runs with its math kernel switched off on CUDA: masks with GQA, fp32 and odd head dims must each
    find a fused kernel (a call none takes raises)."""
    for backend in ("sdpa_bucketed", "sdpa_segments", "dense"):
        for dtype in (torch.float32, torch.bfloat16):
            for name, (hq, hkv, D, causal, window, chunked) in CASES.items():
                torch.manual_seed(6)
                lengths = [5, 33, 1, 130]
                k_lengths = [n + 64 * (i % 2) for i, n in enumerate(lengths)] if chunked else lengths
                q = torch.randn(sum(lengths), hq, D, device=DEVICE, dtype=dtype)
                k, v = (torch.randn(sum(k_lengths), hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
                kw = dict(cu_seqlens_k=cu(k_lengths), max_seqlen_k=max(k_lengths), k_lengths=k_lengths) if chunked else {}
                batch = prepare(backend, cu(lengths), max(lengths), causal=causal, window=window, lengths=lengths, **kw)
                out = varlen_attention(q, k, v, batch)
                want = reference(q, k, v, lengths, causal, window, k_lengths if chunked else None)
                assert_close(out, want, dtype)


def test_the_solo_threshold_is_measured_for_the_model_and_each_tried_length_is_reported(monkeypatch):
    """On a fake clock (each pass costs a set time per length and way), so the answer is known: one call each
    wins clearly (2x) from 32 tokens on, so the split moves below its default of 64. The real measurement runs too, and reports every tried length."""
    import types

    shape = AttentionShape(heads=4, kv_heads=2, head_dim=16, causal=True)
    tried = (8, 16, 32)
    _, words = attention.measure_solo_min(shape, torch.float32, tokens=256, lengths=tried, repeats=1)
    assert [int(part.split(":")[0]) for part in words.split(", ")] == list(tried)

    cost_ms = {16: (1.0, 2.0), 32: (1.0, 0.5), 64: (2.0, 1.0), 128: (4.0, 2.0), 256: (8.0, 3.0)}  # bucketed, solo
    now = [0.0]
    real_prepare = attention.prepare

    def prepare(backend, cu, max_len, *, solo_min, lengths, **kw):
        batch = real_prepare(backend, cu, max_len, solo_min=solo_min, lengths=lengths, **kw)
        return types.SimpleNamespace(cost=cost_ms[lengths[0]][0 if solo_min > max_len else 1] / 1e3, batch=batch)

    def varlen_attention(q, k, v, timed):
        now[0] += timed.cost

    monkeypatch.setattr(attention, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(attention, "prepare", prepare)
    monkeypatch.setattr(attention, "varlen_attention", varlen_attention)
    solo_min, words = attention.measure_solo_min(shape, torch.float32, tokens=256, repeats=2)
    assert attention.SOLO_MIN_LENGTH == attention.ROW_TOKENS + 1 and solo_min == 32
    assert words == "16: 1.0/2.0 ms, 32: 1.0/0.5 ms, 64: 2.0/1.0 ms, 128: 4.0/2.0 ms, 256: 8.0/3.0 ms"


@pytest.mark.parametrize("rows, want", [
    ([(16, 1.0, 2.0), (32, 1.0, 1.5), (64, 1.0, 0.8), (128, 1.0, 0.5), (256, 1.0, 0.4)], 64),  # crossover at 64
    ([(16, 1.0, 2.0), (32, 1.0, 0.5), (64, 1.0, 0.8), (128, 1.0, 0.5), (256, 1.0, 0.4)], 32),  # clearly from 32
    ([(16, 1.0, 2.0), (32, 1.0, 0.95), (64, 1.0, 0.8), (128, 1.0, 0.5), (256, 1.0, 0.4)], 64),  # 32: a near-tie
    ([(16, 0.5, 0.4), (32, 1.0, 2.0), (64, 1.0, 0.8), (128, 1.0, 0.5), (256, 1.0, 0.4)], 64),  # one noisy win
    ([(16, 1.0, 2.0), (32, 1.0, 2.0), (64, 1.0, 1.5), (128, 1.0, 1.3), (256, 1.0, 0.9)], 256),  # clearly later
    ([(16, 1.0, 2.0), (32, 1.0, 2.0), (64, 1.0, 1.05), (128, 1.0, 1.3), (256, 1.0, 0.9)], 64),  # 64: a near-tie
    ([(16, 1.0, 2.0), (32, 1.0, 2.0), (64, 1.0, 1.5), (128, 1.0, 1.3), (256, 1.0, 1.2)], 512),  # bucket them all
])
def test_the_threshold_rule_moves_from_the_default_only_when_clearly_faster(rows, want):
    assert attention.solo_min_from(rows, default=64) == want


@pytest.mark.parametrize("solo_min", [1, 10**9])
def test_either_side_of_the_threshold_gives_the_same_attention(solo_min):
    """Whatever the measurement decides, solo and bucketed runs of the same pass agree."""
    torch.manual_seed(0)
    lengths = [3, 17, 40, 1, 64, 150, 200]  # on the CPU, 150 and 200 are too long to share a row
    q, k, v = (torch.randn(sum(lengths), 4, 16, device=DEVICE) for _ in range(3))
    batch = prepare("sdpa_bucketed", cu(lengths), max(lengths), solo_min=solo_min, lengths=lengths)
    assert_close(varlen_attention(q, k, v, batch), reference(q, k, v, lengths, False), torch.float32)


@pytest.mark.parametrize("causal, window, biased", [(False, None, False), (True, None, False), (True, 8, False),
                                                    (False, None, True)], ids=["plain", "causal", "window", "bias"])
def test_on_the_cpu_short_sequences_share_rows_and_one_mask_serves_every_layer(causal, window, biased):
    """Sequences that fit ``ROW_TOKENS`` share padded rows: fewer rows than sequences, none longer than
    ``ROW_TOKENS``, every token in exactly one slot. Longer ones keep rows of their own. The shared rows' mask is
    built by the first layer and reused by the next; the answer is the reference's, masks and bias included."""
    torch.manual_seed(5)
    lengths = [3, 17, 40, 1, 64, 90, 100, 150, 2, 33]
    T, H, M = sum(lengths), 4, max(lengths)
    q, k, v = (torch.randn(T, H, 16) for _ in range(3))
    per_distance = torch.randn(H, 2 * M - 1) * 3 if biased else None
    offsets = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    batch = prepare("sdpa_bucketed", offsets, M, causal=causal, window=window, solo_min=10**9, lengths=lengths,
                    rel_bias=per_distance)
    shared = [b for b in batch.buckets if b.segments is not None]
    assert len(shared) == 1 and shared[0].length <= attention.ROW_TOKENS
    fits = [n for n in lengths if n <= attention.ROW_TOKENS]
    assert -(-sum(fits) // attention.ROW_TOKENS) <= shared[0].groups < len(fits)
    assert sorted(torch.cat([b.scatter for b in batch.buckets]).tolist()) == list(range(T))

    first = varlen_attention(q, k, v, batch)
    mask = shared[0].masks[torch.float32]
    second = varlen_attention(q, k, v, batch)
    assert shared[0].masks[torch.float32] is mask and torch.equal(first, second)
    bias = None if per_distance is None else (lambda d: per_distance[:, d + M - 1])
    assert_close(first.to(DEVICE), reference(q, k, v, lengths, causal, window, bias_by_distance=bias), torch.float32)


def test_a_compute_dtype_runs_attention_in_it_and_answers_in_the_inputs_dtype():
    """``prepare(dtype=bf16)`` on float32 q/k/v (an int8 model's attention on a CPU with native bf16): the same
    answer as casting them by hand and running bf16, handed back in float32, and close to the fp32 reference."""
    torch.manual_seed(0)
    lengths = [3, 17, 40, 1, 64, 90]
    q, k, v = (torch.randn(sum(lengths), 4, 16, device=DEVICE) for _ in range(3))
    backend = "sdpa_bucketed"
    got = varlen_attention(q, k, v, prepare(backend, cu(lengths), max(lengths), lengths=lengths,
                                            dtype=torch.bfloat16))
    by_hand = varlen_attention(*(t.bfloat16() for t in (q, k, v)),
                               prepare(backend, cu(lengths), max(lengths), lengths=lengths))
    assert got.dtype == torch.float32
    assert torch.equal(got, by_hand.float())
    assert_close(got, reference(q, k, v, lengths, False), torch.bfloat16)


# Compute capability decides too (issue 25): FlashAttention-2 needs Ampere (sm_80); a T4 (sm_75) gets SDPA.
GPUS = {"T4 (sm_75)": (7, 5), "A100 (sm_80)": (8, 0), "A10 (sm_86)": (8, 6), "L4 (sm_89)": (8, 9),
        "H100 (sm_90)": (9, 0)}


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backend_table_by_gpu_generation(gpu, shape, dtype):
    capability, s, caps = GPUS[gpu], SHAPES[shape], SIGNATURES["2.12+"]
    for flash_attn in (NO_FLASH_ATTN, None):
        got = choose_backend("cuda", dtype, s, caps=caps, flash_attn=flash_attn, capability=capability)
        assert got == (S if capability < (8, 0) else V), (gpu, flash_attn)
    if capability < (8, 0):
        for backend in ("torch_varlen", "flash_attn"):
            with pytest.raises(ValueError, match=r"compute capability 8\.0 \(Ampere\) or newer; this GPU is sm_75"):
                choose_backend("cuda", dtype, s, backend, caps=caps, flash_attn=None, capability=capability)

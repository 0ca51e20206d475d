"""The fused linear kernel against its pure-torch twin (and fp64 for accuracy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedserve.kernels.linear import ACTIVATIONS, linear, select_linear_backend

CPU = torch.device("cpu")


def backends(dtype):
    return sorted({"torch", select_linear_backend(CPU, dtype)})


# The reference, written out with torch's own functions (not the kernel module's table): each activation name's
# meaning, as the model families' configs use it (hidden_act "gelu" is the erf form, "gelu_new" the tanh one).
REFERENCE_ACTS = {
    "none": lambda y: y,
    "identity": lambda y: y,
    "gelu": lambda y: 0.5 * y * (1 + torch.erf(y / 2**0.5)),
    "gelu_tanh": lambda y: 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3))),
    "relu": lambda y: y.clamp_min(0),
    "silu": lambda y: y * torch.sigmoid(y),
    "tanh": torch.tanh,
}


def test_every_activation_has_a_written_out_reference():
    assert set(REFERENCE_ACTS) == set(ACTIVATIONS)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 7, 3), (37, 384, 1000), (300, 50, 36)])
def test_fp32_matches_fp64_reference(act, shape):
    T, n_in, n_out = shape
    torch.manual_seed(0)
    x, w, b = torch.randn(T, n_in), torch.randn(n_out, n_in) / n_in**0.5, torch.randn(n_out)
    want = REFERENCE_ACTS[act](x.double() @ w.double().T + b.double())
    for backend in backends(torch.float32):
        got = linear(x, w, b, act, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backends_agree(dtype):
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 96), torch.randn(80, 96) / 10, torch.randn(80)
    want = F.gelu(F.linear(x, w, b))
    for backend in backends(dtype):
        got = linear(x.to(dtype), w.to(dtype), b.to(dtype), "gelu", backend=backend)
        assert got.dtype == dtype
        assert F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0) > 0.999


def test_no_bias():
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    for backend in backends(torch.float32):
        torch.testing.assert_close(linear(x, w, None, backend=backend), x @ w.T)


def test_choice_is_logged(caplog):
    caplog.set_level("INFO")
    choice = select_linear_backend(CPU, torch.float32)
    assert f"linear backend: {choice}" in caplog.text
    assert select_linear_backend(torch.device("cuda"), torch.float16) == "torch"


def test_a_server_of_ever_changing_row_counts_keeps_bounded_onednn_caches():
    """Packed steps give the fused linear a new row count nearly every time; oneDNN (and torch's ideep layer)
    cache one primitive per shape. In a fresh process (the caches are sized at first use), 315 row counts twice
    over grow the process by about 236 MB with the default 1024-entry caches and about 97 MB with the 128 this
    package sets; the bound is checked at 150 MB, and a second pass over the same shapes must not grow it."""
    import subprocess
    import sys

    if select_linear_backend(CPU, torch.float32) != "onednn":
        pytest.skip("no oneDNN linear on this CPU: no primitive caches to bound")
    code = (
        "import ctypes, re, torch\n"
        "from embedserve.kernels.linear import linear, select_linear_backend\n"
        "assert select_linear_backend(torch.device('cpu'), torch.float32) == 'onednn'\n"
        "trim = ctypes.CDLL('libc.so.6').malloc_trim\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "w, b = torch.randn(1536, 384), torch.randn(1536)\n"
        "trim(0); start = rss()\n"
        "for p in range(2):\n"
        "    for m in range(1, 4096, 13):\n"
        "        linear(torch.randn(m, 384), w, b, 'gelu', 'onednn')\n"
        "    trim(0); print(rss() - start)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    first, second = (int(x) for x in out.stdout.split())
    assert first < 150, f"the fused linear's caches grew the process by {first} MB"
    assert second - first < 20


def test_row_counts_round_up_to_few_sizes_wasting_at_most_a_sixteenth():
    """The GEMM's row counts (:func:`granular_rows`): never fewer than asked, at most 1/16 more (16 at the
    smallest), and few distinct ones, so oneDNN's per-shape kernels repeat from step to step."""
    from embedserve.kernels.linear import granular_rows

    got = {n: granular_rows(n) for n in range(1, 8193)}
    assert all(n <= g <= max(n + 15, n * 17 // 16) and g % 16 == 0 for n, g in got.items())
    assert len(set(got.values())) <= 32 + 16 * 4  # 16, 32 .. 512, then 16 per doubling to 8192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_padded_rows_change_no_real_row_and_a_cut_output_feeds_the_next_gemm_in_place(dtype, backend):
    """project() runs the GEMM on rounded-up rows and cuts its output: each real row is what the layer gives
    for that row alone; the next layer reads the cut output in place (its rows past the cut are there), and
    whatever finite values those rows hold change nothing. Rows it adds itself are zeros, never uninitialised
    memory (a NaN there reaches the last real row through oneDNN's reads past a row's end, at inner sizes
    such as 74: see _with_rows)."""
    from embedserve.kernels.linear import LinearPlan, _with_rows, granular_rows, project

    if backend == "onednn" and select_linear_backend(CPU, dtype) != "onednn":
        pytest.skip(f"no oneDNN linear for {dtype} on this CPU")
    torch.manual_seed(0)
    up, down = torch.nn.Linear(74, 96).to(dtype), torch.nn.Linear(96, 40).to(dtype)
    plan = LinearPlan(backend)
    for rows in (1, 17, 300, 513, 1030):
        x = torch.randn(rows, 74).to(dtype)
        h = project(x, up, "gelu", plan)
        assert h.shape == (rows, 96) and h.is_contiguous()
        assert granular_rows(rows) != rows and _with_rows(h, granular_rows(rows), dtype).data_ptr() == h.data_ptr()
        # The rows past the cut: large finite values, the answer must not move.
        spare = h.as_strided((granular_rows(rows) - rows, 96), (96, 1), h.storage_offset() + rows * 96)
        spare.fill_(3e4)
        assert not _with_rows(x, granular_rows(rows), dtype)[rows:].any()  # a copy's own rows are zeros
        y = project(h, down, "none", plan)
        atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
        for i in (0, rows // 2, rows - 1):  # a row alone, through the unpadded layers
            want = linear(linear(x[i : i + 1], up.weight, up.bias, "gelu", backend), down.weight, down.bias)
            torch.testing.assert_close(y[i : i + 1].float(), want.float(), atol=atol, rtol=rtol)
        assert torch.isfinite(y).all()


# -- int8 layers ----------------------------------------------------------------------------------------------


def _layer_and_inputs(n_in=384, n_out=256, rows=300, seed=0):
    """A layer and inputs with a few outlier channels and rows of very different sizes, as transformers have."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
    x = torch.randn(rows, n_in, generator=g)
    x[:, [3, 77, 200]] *= 25.0  # outlier channels
    x[::7] *= 10.0  # some tokens far larger than others
    return layer, x


def _gemms():
    from embedserve.kernels.linear import int8_gemm

    return ["int_mm"] + (["onednn"] if int8_gemm() == "onednn" else [])


def _activation_kinds():
    """(gemm, unsigned, steps): signed activations on each GEMM, unsigned 7- and 8-bit ones on oneDNN's."""
    signed = [(g, False, 127) for g in _gemms()]
    return signed + ([("onednn", True, 127), ("onednn", True, 254)] if "onednn" in _gemms() else [])


def _after_gelu(x):
    return F.gelu(x / 4.0) * 4.0  # mostly positive, a little below zero, as an MLP's output projection sees


@pytest.mark.parametrize("weight_max", [127, 63])
@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_layer_against_float(weight_max, smoothed):
    from embedserve.kernels.linear import Int8Linear, int8_weight_max

    if weight_max == 127 and int8_weight_max() != 127:
        pytest.skip("this CPU's int8 GEMM saturates full 8-bit products (no VNNI)")
    layer, x = _layer_and_inputs()
    q = Int8Linear(layer, x.abs().amax(dim=0) if smoothed else None, weight_max=weight_max)
    got, want = q(x), layer(x).detach()
    cos = F.cosine_similarity(got, want)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert cos.min() >= (0.999 if smoothed else 0.995), float(cos.min())


@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("positive", [False, True])
@pytest.mark.parametrize("steps", [127, 254])
def test_unsigned_int8_activations_against_float(smoothed, positive, steps):
    """Per-row zero points, 8-bit weights (7-bit levels: what CPUs without VNNI run for the narrowing layers;
    8-bit levels: what CPUs with VNNI run there): as close to float as signed activations are, on inputs of
    either sign and on mostly positive ones; and the rows whose range does not straddle zero (all positive, all
    negative, all zero) still quantize exactly enough. On the mostly positive inputs, 8-bit unsigned levels are
    closer to float than signed ones, as an MLP's output projection needs."""
    from embedserve.kernels.linear import Int8Linear, int8_weight_max

    if "onednn" not in _gemms():
        pytest.skip("this torch has no oneDNN int8 linear")
    if steps == 254 and int8_weight_max() != 127:
        pytest.skip("this CPU's int8 GEMM saturates full 8-bit products (no VNNI)")
    layer, x = _layer_and_inputs()
    if positive:
        x = _after_gelu(x)
    x[5], x[6], x[8] = x[5].abs() + 1.0, -x[6].abs() - 1.0, 0.0
    absmax = x.abs().amax(dim=0) if smoothed else None
    q = Int8Linear(layer, absmax, gemm="onednn", unsigned=True, steps=steps)
    got, want = q(x), layer(x).detach()
    cos = F.cosine_similarity(got[:8], want[:8]).tolist() + F.cosine_similarity(got[9:], want[9:]).tolist()
    assert min(cos) >= (0.999 if smoothed else 0.995), min(cos)
    torch.testing.assert_close(got[8], layer.bias.detach())  # a zero row gives the bias
    if positive and steps == 254:
        signed = Int8Linear(layer, absmax, gemm="onednn")(x)
        assert (got - want).pow(2).sum() < 0.75 * (signed - want).pow(2).sum()


def _skip_unless_fused(gemm):
    from embedserve.kernels.linear import int8_fusion_problem

    if (why := int8_fusion_problem(gemm)) is not None:
        pytest.skip(why)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("gemm, unsigned, steps", _activation_kinds())
def test_int8_rows_do_not_depend_on_their_neighbours(gemm, unsigned, steps, fused):
    """Per-row activation scales and exact int32 sums: a row's output is bit-identical alone or in a batch, with
    the eager passes and the fused ones (a row alone goes through them padded to two)."""
    from embedserve.kernels.linear import Int8Linear

    if fused:
        _skip_unless_fused(gemm)
    layer, x = _layer_and_inputs()
    q = Int8Linear(layer, x.abs().amax(dim=0), gemm=gemm, unsigned=unsigned, steps=steps, fused=fused)
    batch = q(x)
    for i in (0, 7, 150, 299):
        assert torch.equal(q(x[i : i + 1])[0], batch[i]), i


@pytest.mark.parametrize("smoothed, bias", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("gemm, unsigned, steps", _activation_kinds())
def test_fused_int8_levels_are_the_eager_levels_and_the_layer_gives_the_same_output(gemm, unsigned, steps,
                                                                                     smoothed, bias):
    """Where inductor builds it, the fused pass quantizes to the eager passes' levels exactly (so the GEMM's sums
    and the layer's output are bit-identical), for every activation kind, with and without smoothing and bias,
    an activation after, and rows of every size the engine sends (one row goes through padded to two)."""
    from embedserve.kernels import int8_passes
    from embedserve.kernels.linear import Int8Linear, _signed_levels_dtype

    _skip_unless_fused(gemm)
    layer, x = _layer_and_inputs()
    if not bias:
        layer.bias = None
    if unsigned:
        x = _after_gelu(x)
    absmax = x.abs().amax(dim=0) if smoothed else None
    kw = dict(gemm=gemm, unsigned=unsigned, steps=steps)
    eager, fused = Int8Linear(layer, absmax, **kw), Int8Linear(layer, absmax, fused=True, **kw)
    smooth = torch.ones(()) if eager.smooth is None else eager.smooth
    for rows in (300, 17, 2, 1):
        for act in ("none", "gelu"):
            got, want = fused(x[:rows], act), eager(x[:rows], act)
            assert got.dtype == torch.float32 and torch.equal(got, want), (rows, act)
        if rows == 1:
            continue
        if unsigned:
            levels, row, zero = int8_passes.compiled["unsigned_levels"](x[:rows], smooth, float(steps))
            want_levels, want_row, want_zero = int8_passes.unsigned_levels(x[:rows], smooth, float(steps))
            assert torch.equal(zero, want_zero)
        else:
            dtype = _signed_levels_dtype(gemm)
            levels, row = int8_passes.compiled["signed_levels"](x[:rows], smooth, dtype)
            want_levels, want_row = int8_passes.signed_levels(x[:rows], smooth, dtype)
        assert torch.equal(levels, want_levels) and torch.equal(row, want_row)


def test_without_a_working_inductor_the_fused_passes_are_refused_and_say_why(monkeypatch):
    """No C++ compiler (inductor fails to build): fusion_problem answers why, and nothing compiled is kept."""
    import torch._inductor.config as inductor

    from embedserve.kernels import int8_passes

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "no-such-compiler++"))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # nothing built earlier may stand in
    monkeypatch.setattr(int8_passes, "compiled", {})
    int8_passes.fusion_problem.cache_clear()
    torch._dynamo.reset()
    try:
        why = int8_passes.fusion_problem(torch.int8)
    finally:
        int8_passes.fusion_problem.cache_clear()
        torch._dynamo.reset()
    assert why is not None and why.startswith("inductor could not build the fused int8 passes"), why
    assert int8_passes.compiled == {}


@pytest.mark.parametrize("gemm", _gemms())
def test_int8_weight_max_is_what_the_gemm_sums_exactly(gemm):
    from embedserve.kernels.linear import _Int8Weight, int8_available, int8_weight_max

    assert int8_available() is None
    bound = int8_weight_max()
    assert bound in (127, 63)

    def exact(q, w):
        got = _Int8Weight(w, gemm).matmul(q.clone(), torch.ones(w.shape[0]))
        return torch.equal(got, (q.long() @ w.long().t()).float())

    for sign in (1, -1):  # the worst cases: every product at its largest
        a = torch.full((3, 256), 127 * sign, dtype=torch.int8)
        assert exact(a, torch.full((5, 256), bound, dtype=torch.int8))
        assert exact(a, torch.full((5, 256), -bound, dtype=torch.int8))
    x = torch.randint(-127, 128, (64, 512), dtype=torch.int8)
    assert exact(x, torch.randint(-bound, bound + 1, (32, 512), dtype=torch.int8))


def test_unsigned_activations_sum_exactly_with_8_bit_weights_on_any_cpu():
    """7-bit unsigned levels reach 128 at most (rounding at the top of a row), computed less 128 (-128..0) and
    given to oneDNN as bytes (plus 128: the levels) with zero point 0; 2 x 128 x 127 fits the 16-bit pair sums
    of a CPU without VNNI, so 8-bit weights stay exact (run this under ONEDNN_MAX_CPU_ISA=AVX2 to see)."""
    from embedserve.kernels.linear import _Int8Weight

    if "onednn" not in _gemms():
        pytest.skip("this torch has no oneDNN int8 linear")
    for level in (128, 127, 0):
        stored = torch.full((3, 256), level - 128, dtype=torch.int8)
        for w_value in (127, -127):
            w = torch.full((5, 256), w_value, dtype=torch.int8)
            got = _Int8Weight(w, "onednn").matmul(stored.clone(), torch.ones(5), zero_point=0)  # consumed
            assert torch.equal(got, torch.full((3, 5), float(level * w_value * 256))), (level, w_value)
    levels = torch.randint(0, 129, (64, 512))
    w = torch.randint(-127, 128, (32, 512), dtype=torch.int8)
    got = _Int8Weight(w, "onednn").matmul((levels - 128).to(torch.int8), torch.ones(32), zero_point=0)
    assert torch.equal(got, (levels @ w.long().t()).float())


def test_both_int8_gemms_give_the_same_layer():
    """oneDNN's int8 linear (channel scales in its epilogue) and ``_int_mm`` + a scaling pass agree."""
    from embedserve.kernels.linear import Int8Linear, int8_gemm

    if int8_gemm() != "onednn":
        pytest.skip("this torch has no oneDNN int8 linear")
    layer, x = _layer_and_inputs()
    absmax = x.abs().amax(dim=0)
    got = Int8Linear(layer, absmax, gemm="onednn")(x)
    want = Int8Linear(layer, absmax, gemm="int_mm")(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight_max, gemm, down", [(127, "int_mm", "signed"), (127, "onednn", "unsigned 254"),
                                                     (63, "int_mm", "float"), (63, "onednn", "unsigned 127")])
def test_quantize_int8_swaps_the_layers(weight_max, gemm, down):
    """On oneDNN's GEMM the narrowing layer takes unsigned activations, 8-bit with 8-bit weights elsewhere and
    7-bit (with 8-bit weights) where the others have 7-bit weights; on _int_mm it is signed with 8-bit weights
    and stays float with 7-bit ones."""
    from embedserve.kernels.linear import Int8Linear, quantize_int8

    if gemm not in _gemms():
        pytest.skip("this torch has no oneDNN int8 linear")
    block = torch.nn.Module()
    block.up, block.down, block.norm = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8)
    absmax = {block.up: torch.ones(8)}
    assert quantize_int8(block, absmax, weight_max=weight_max, gemm=gemm) == (1 if down == "float" else 2)
    assert isinstance(block.up, Int8Linear) and block.up.smooth is not None and not block.up.unsigned
    assert block.up.gemm == gemm
    if down == "float":
        assert isinstance(block.down, torch.nn.Linear)
    else:
        assert isinstance(block.down, Int8Linear) and block.down.unsigned == down.startswith("unsigned")
        if block.down.unsigned:
            assert block.down.steps == float(down.split()[1])
    assert isinstance(block.norm, torch.nn.LayerNorm)


# -- the plan: per-shape choice, calibration ------------------------------------------------------------------


def test_the_plan_measures_each_shape_once_on_a_full_sized_call_and_keeps_the_faster():
    from embedserve.kernels.linear import LinearPlan, project

    backend = select_linear_backend(CPU, torch.float32)
    if backend == "torch":
        pytest.skip("no fused backend on this CPU: nothing to choose between")
    plan = LinearPlan(backend, probe=True)
    up, down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
    small = torch.randn(8, 64)
    torch.testing.assert_close(project(small, up, "gelu", plan), F.gelu(up(small)), atol=1e-5, rtol=1e-5)
    assert plan.chosen == {}  # too few rows to judge by
    x = torch.randn(512, 64)
    h = project(x, up, "gelu", plan)
    project(h, down, plan=plan)
    assert set(plan.chosen) == {(256, 64, "gelu", torch.float32), (64, 256, "none", torch.float32)}
    words = plan.describe()
    assert "64->256+gelu" in words and "256->64" in words
    torch.testing.assert_close(project(x, up, "gelu", plan), F.gelu(up(x)), atol=1e-5, rtol=1e-5)
    assert LinearPlan("torch", probe=True).probe is False  # one backend: nothing to measure


@pytest.mark.parametrize("fused_s, torch_s, want, gain", [
    (2.0, 1.0, "torch", 2.0),  # F.linear twice as fast: it takes the shape
    (1.05, 1.0, "fused", 1 / 1.05),  # within the 10% margin: the default is kept
    (1.0, 3.0, "fused", 3.0),  # the default faster
])
def test_the_plan_keeps_the_default_unless_f_linear_is_clearly_faster(monkeypatch, fused_s, torch_s, want, gain):
    """The choice itself, on a fake clock: each backend's call takes a set time, so the rule is checked on
    known timings instead of restated over whatever this host measured."""
    import types

    from embedserve.kernels import linear as module
    from embedserve.kernels.linear import LinearPlan

    now = [0.0]
    cost = {"fused": fused_s, "torch": torch_s}
    real = module.linear

    def timed_linear(x, w, b, act="none", backend="torch"):
        now[0] += cost[backend]
        return real(x, w, b, act, "torch")

    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(module, "linear", timed_linear)
    plan = LinearPlan("fused", probe=True)
    layer = torch.nn.Linear(8, 4)
    assert plan.backend(torch.randn(512, 8), layer, "gelu") == want
    name, measured = plan.chosen[(4, 8, "gelu", torch.float32)]
    assert name == want and measured == pytest.approx(gain)


def test_int8_time_ratio_times_each_int8_layer_against_a_copy_of_its_float_layer_in_the_dtype(monkeypatch):
    """On a fake clock (an int8 layer 3 units, a float GEMM 2): the ratio is int8's time over the float copies',
    the copies run in the dtype asked for on the given rows, and the layers passed in are left as they were."""
    import types

    from embedserve.kernels import linear as module
    from embedserve.kernels.linear import Int8Linear, int8_time_ratio

    now = [0.0]
    seen = []
    real = module.linear

    def timed_linear(x, w, b, act="none", backend="torch"):
        seen.append((x.dtype, w.dtype, b.dtype, tuple(x.shape)))
        now[0] += 2.0
        return real(x, w, b, act, backend)

    def timed_int8(self, x, act="none"):
        now[0] += 3.0
        return torch.zeros(x.shape[0], self.out_features)

    layers = [torch.nn.Linear(16, 48), torch.nn.Linear(48, 16)]
    before = [layer.weight.clone() for layer in layers]
    pairs = [(layer, Int8Linear(layer)) for layer in layers]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(module, "linear", timed_linear)
    monkeypatch.setattr(Int8Linear, "forward", timed_int8)
    assert int8_time_ratio(pairs, torch.bfloat16, rows=64, repeats=3) == pytest.approx(1.5)
    # one untimed round and three timed ones, each through both layers
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, (64, 16)),
                    (torch.bfloat16, torch.bfloat16, torch.bfloat16, (64, 48))] * 4
    assert all(layer.weight.dtype == torch.float32 and torch.equal(layer.weight, w)
               for layer, w in zip(layers, before))


def test_calibration_records_each_layers_largest_input_per_channel():
    from embedserve.kernels.linear import LinearPlan, project

    plan, layer = LinearPlan(), torch.nn.Linear(16, 4)
    a, b = torch.randn(10, 16), torch.randn(3, 16) * 5
    with plan.calibrate() as absmax:
        project(a, layer, plan=plan)
        project(b, layer, plan=plan)
    torch.testing.assert_close(absmax[layer], torch.cat([a, b]).abs().amax(dim=0))
    assert plan.absmax is None  # recording stops on leaving

"""Linear layer with a fused activation, behind one function.

Backends, the usable one chosen per (device, dtype) at start-up by :func:`select_linear_backend` and logged:

- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on CPU, bias and activation fused into the GEMM, with the
  same fp32 accuracy. Whether it is faster than ``F.linear`` depends on the CPU, dtype and layer shape (on the
  2-core AVX-512 development machine 1.0-1.3x in fp32 at MiniLM's shapes; ``benchmarks/bench_kernels.py``), so
  a :class:`LinearPlan` times both on each layer shape's first full-size call (the warm-up's) and keeps the faster.
- ``torch``: ``F.linear`` then the activation: the pure-torch twin, used on CUDA and as the test oracle.
- ``int8`` (``--quantize int8``, CPU): :class:`Int8Linear` replaces a model's ``nn.Linear``: weights int8 per
  output channel, activations int8 per token, an int8 GEMM with exact int32 sums (oneDNN's int8 linear, else
  ``torch._int_mm``: :func:`int8_gemm`), output float32. Each GEMM's input levels come from one pass that inductor
  compiles at start-up where a C++ compiler is there (:mod:`int8_passes`), else from eager passes.
"""

from __future__ import annotations

import logging
import os

# oneDNN compiles one primitive per GEMM shape and caches it (so does torch's ideep layer above it), and a packed
# server sees a new token count at nearly every step: with the default caches (1024 entries each, about 0.6 MB per
# entry) a CPU server grows by hundreds of MB as shapes come and go. 128 entries bound that. A miss costs one
# primitive creation: well under a millisecond on AVX-512 alone, but 5-14 ms per GEMM on an AMX Xeon, more than
# the GEMM; so project() rounds the row count up (granular_rows) and steady traffic hits the cache. Both are read
# at first use, so they are set on import; an operator's own values win. (0 is not an option: torch's LRU cache
# crashes with it.)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

import contextlib  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Iterator  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from embedserve.kernels import int8_passes  # noqa: E402

log = logging.getLogger(__name__)

# Our activation names -> (oneDNN post-op, its algorithm argument).
_ONEDNN_POSTOPS = {
    "none": ("none", ""),
    "identity": ("none", ""),
    "gelu": ("gelu", "none"),  # erf form
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}

_TORCH_ACTS = {
    "none": lambda x: x,
    "identity": lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

ACTIVATIONS = tuple(_TORCH_ACTS)


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` (one of :data:`ACTIVATIONS`) applied on its own, as a gated MLP applies it to its gate."""
    return _TORCH_ACTS[name](x)


def _onednn_works(dtype: torch.dtype) -> bool:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.randn(5, 7).to(dtype)
        w = torch.randn(3, 7).to(dtype)
        b = torch.randn(3).to(dtype)
        got = op(x, w, b, "gelu", [], "none")
        want = F.gelu(F.linear(x.float(), w.float(), b.float()))
    except RuntimeError:
        return False
    return bool(torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2))


def select_linear_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    if requested == "torch" or device.type != "cpu":
        choice = "torch"
    elif _onednn_works(dtype):
        choice = "onednn"
    elif requested == "onednn":
        raise ValueError(f"the onednn linear backend does not run {dtype} on this CPU")
    else:
        choice = "torch"
    log.info("linear backend: %s (%s, %s)", choice, device.type, str(dtype).removeprefix("torch."))
    return choice


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none", backend: str = "torch"
) -> torch.Tensor:
    """``act(x @ weight.T + bias)``; x ``[T, in]``, weight ``[out, in]`` -> ``[T, out]``."""
    if backend == "onednn":
        post = _ONEDNN_POSTOPS.get(act)
        if post is not None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post[0], [], post[1])
        return _TORCH_ACTS[act](torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))
    return _TORCH_ACTS[act](F.linear(x, weight, bias))


# -- per layer: the plan that picks a backend per shape, and int8 layers -------------------------------------


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with int8 weights (symmetric, one scale per output channel) and int8 activations (one
    scale per row, that is per token, found at each call), multiplied by an int8 GEMM with exact int32 sums
    (:func:`int8_gemm`) and scaled back to float32. The float weights are not kept.

    Per-token scales keep a token's precision from depending on the other tokens of its step: the int32 sums are
    exact, so a text's vector is the same whatever it is packed with. Outlier *channels* (a few input channels
    far larger than the rest, as transformer activations have) would still cost every token precision:
    ``input_absmax``, the largest magnitude each input channel took on calibration text, moves that range into
    the weights, SmoothQuant's way: the input is divided per channel by
    ``s = absmax**alpha / weight_absmax**(1 - alpha)`` and the weight's columns multiplied by it.

    ``weight_max``: 127, or 63 where the CPU has no VNNI: there oneDNN sums pairs of 8-bit products in 16 bits,
    which saturate unless one side has 7 bits (:func:`int8_weight_max` measures it).

    ``unsigned`` (oneDNN's GEMM only): each row's activations take unsigned levels from its own minimum (level
    0) to its maximum (level ``steps``, 127 or 254), a zero point per row, and the GEMM's sums are corrected for
    the zero points (one rank-1 term). For an input that is mostly positive (after a GELU), a signed scale spends
    half its levels below zero, where next to nothing is: unsigned levels are twice as fine. With VNNI (``steps``
    254: 8-bit levels) that took MiniLM's worst cosine against sentence-transformers on the parity texts from
    0.9935 to 0.9959, at the same speed. Without VNNI (``steps`` 127: 7-bit levels) they never saturate the 16-bit
    pair sums, so the weights keep 8 bits there.
    """

    def __init__(self, layer: nn.Linear, input_absmax: torch.Tensor | None = None, *, alpha: float = 0.5,
                 weight_max: int = 127, gemm: str | None = None, unsigned: bool = False, steps: int = 127,
                 fused: bool = False) -> None:
        super().__init__()
        self.gemm = gemm or int8_gemm()
        # fused: the levels come from int8_passes' compiled pass (only where its fusion_problem() is None)
        self.fused = fused
        self._ones = torch.ones(())
        if unsigned and self.gemm != "onednn":
            raise ValueError("unsigned int8 activations need oneDNN's int8 GEMM")
        if steps not in (127, 254):
            raise ValueError(f"unsigned activations cut a row's range into 127 or 254 steps, not {steps}")
        self.unsigned, self.steps = unsigned, float(steps)
        w = layer.weight.detach().float()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.smooth: torch.Tensor | None = None
        if input_absmax is not None:
            s = input_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)
            s = s.clamp(min=1e-5)
            w = w * s
            self.smooth = 1.0 / s
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / weight_max  # [out]
        w8 = torch.round(w / self.scale[:, None]).to(torch.int8)
        self.int8 = _Int8Weight(w8, self.gemm)
        # The zero points' share of the sums, per output channel and unit of zero point, scaled like them.
        self.zero_sums = w8.sum(dim=1, dtype=torch.int32).float() * self.scale if unsigned else None
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(self, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """``act(layer(x))``: levels (the fused pass where this layer has it, else the eager passes), the GEMM, and
        the sums back to float32 in place."""
        n = x.shape[0]
        levels, row, zero = self._fused_levels(x) if self.fused and n else self._eager_levels(x)
        y = self.int8.matmul(levels, self.scale, zero_point=0 if self.unsigned else 128)[:n]
        if zero is not None:
            # row * (sums - zero * weight sums) * scale + bias: the zero points' rank-1 share, then the row scales.
            y.addr_(zero.view(-1), self.zero_sums, alpha=-1)
        # The GEMM multiplied by the weights' channel scales; the row scales (and the bias) take one more pass.
        y = y.mul_(row) if self.bias is None else torch.addcmul(self.bias, y, row, out=y)
        return _TORCH_ACTS[act](y)

    def _fused_levels(self, x: torch.Tensor):
        """(levels on :func:`granular_rows` rows, row scales, zero points or None) from int8_passes' compiled
        pass: one read for the rows' ranges, one for the levels."""
        n = x.shape[0]
        if n == 1:
            x = _with_rows(x, 2, x.dtype)  # compiled sizes are symbolic from 2 up: one row would build another kernel
        smooth = self._ones if self.smooth is None else self.smooth
        if self.unsigned:
            levels, row, zero = int8_passes.compiled["unsigned_levels"](x, smooth, self.steps)
            return _int8_levels(levels[:n]), row[:n], zero[:n]
        levels, row = int8_passes.compiled["signed_levels"](x, smooth, _signed_levels_dtype(self.gemm))
        return _int8_levels(levels[:n]), row[:n], None

    def _eager_levels(self, x: torch.Tensor):
        """As :meth:`_fused_levels`, in eager passes: int8 levels (unsigned ones less 128)."""
        # Each row's largest magnitude (two plain reductions run faster than abs-then-max, aminmax or a norm);
        # the smoothed copy is ours to scale in place.
        if self.smooth is not None:
            x = x * self.smooth
        hi, lo = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
        if not self.unsigned:
            row = torch.maximum(hi, lo.neg_()).clamp_(min=1e-12).div_(127.0)
            return _int8_levels((x.div_(row) if self.smooth is not None else x / row).round_()), row, None
        # The levels span the row's range and zero: the minimum at level 0 and zero at level ``zero`` (an
        # integer), the maximum at ``steps`` (by rounding, one above): 128 (2 x 128 x 127 still fits the 16-bit
        # pair sums of a CPU without VNNI) or 255. They are computed less 128, as the signed levels are (a
        # float-to-int8 cast is several times faster than one to uint8), and the GEMM's byte pass adds it back.
        lo.clamp_(max=0.0)
        row = hi.clamp_(min=0.0).sub_(lo).clamp_(min=1e-12).div_(self.steps)
        zero = lo.div_(row).neg_().round_()
        levels = (x.div_(row) if self.smooth is not None else x / row).add_(zero - 128.0).round_()
        return _int8_levels(levels), row, zero

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.smooth is not None else ""
        levels = ", activations unsigned per row" if self.unsigned else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 ({self.gemm}){levels}"
                f"{smooth}")


class _Int8Weight:
    """An int8 weight ``[out, in]`` laid out for one GEMM. ``matmul(q, scale)``: ``(q @ weight.T) * scale`` in
    float32 for int8 ``q [T, in]`` (consumed), the sums exact.

    - ``onednn``: ``torch.ops.onednn.qlinear_pointwise``, the int8 linear torch's x86 inductor path runs. It
      takes unsigned activations with a zero point, so ``q + 128`` (a byte-wide pass) with zero point 128, and
      multiplies by the channel scales in the GEMM's own epilogue. (Signed activations fall to a reference
      loop hundreds of times slower.) ``zero_point=0``: ``q + 128`` are unsigned levels, summed as they are
      (a CPU without VNNI sums levels up to 128 exactly; its zero point 128 path does not).
    - ``int_mm``: ``torch._int_mm`` (int32 out; signed levels only), then a separate pass for the channel scales.
    """

    def __init__(self, weight: torch.Tensor, gemm: str) -> None:
        self.gemm = gemm
        if gemm == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
            self.zero = torch.zeros(weight.shape[0], dtype=torch.int64)
        else:
            self.packed = weight.t()  # the layout _int_mm takes fastest

    def matmul(self, q: torch.Tensor, scale: torch.Tensor, zero_point: int = 128) -> torch.Tensor:
        """``q``: int8 levels, or for oneDNN's GEMM uint8 ones already shifted by 128 (the fused passes')."""
        if self.gemm == "onednn":
            u = q if q.dtype == torch.uint8 else q.view(torch.uint8).add_(128)  # wraps: -128..127 -> 0..255
            return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero_point, self.packed, scale, self.zero, None, 1.0,
                                                       0, torch.float32, "none", [], "")
        return torch.mul(torch._int_mm(q, self.packed), scale)


def _int8_sums_exact(gemm: str, q: torch.Tensor, weight: torch.Tensor) -> bool:
    got = _Int8Weight(weight, gemm).matmul(q.clone(), torch.ones(weight.shape[0]))
    return torch.equal(got, (q.long() @ weight.long().t()).float())


def _signed_levels_dtype(gemm: str) -> torch.dtype:
    """The dtype the fused passes hand signed levels to ``gemm`` in: oneDNN's takes them unsigned, 128 up."""
    return torch.uint8 if gemm == "onednn" else torch.int8


def int8_fusion_problem(gemm: str | None = None) -> str | None:
    """None where the fused int8 passes (:mod:`int8_passes`) build and check out here, for ``gemm``'s levels;
    else why not. The first call compiles them (seconds)."""
    return int8_passes.fusion_problem(_signed_levels_dtype(gemm or int8_gemm()))


@functools.cache
def int8_gemm() -> str:
    """``onednn`` where torch has oneDNN's int8 linear and it sums a trial exactly, else ``int_mm``."""
    if getattr(torch.ops.onednn, "qlinear_pointwise", None) is None or not torch.backends.mkldnn.is_available():
        return "int_mm"
    try:
        q = torch.randint(-127, 128, (5, 32), dtype=torch.int8)
        w = torch.randint(-63, 64, (8, 32), dtype=torch.int8)
        return "onednn" if _int8_sums_exact("onednn", q, w) else "int_mm"
    except (RuntimeError, AttributeError):
        return "int_mm"


def int8_weight_max() -> int:
    """127 where the int8 GEMM sums full 8-bit products exactly (VNNI), else 63; a small worst case decides.
    (Without VNNI oneDNN sums pairs of unsigned activations, signed ones shifted by 128, times the weights in 16
    bits: the largest pair is 255 x weight x 2.)"""
    for bound in (127, 63):
        if _int8_sums_exact(int8_gemm(), torch.full((4, 64), 127, dtype=torch.int8),
                            torch.full((8, 64), bound, dtype=torch.int8)):
            return bound
    return 63


def int8_available() -> str | None:
    """None when torch's int8 GEMM runs here (exactly, at 7-bit weights at least); else why not."""
    if not hasattr(torch, "_int_mm") and int8_gemm() == "int_mm":
        return f"torch {torch.__version__} has no int8 GEMM (torch._int_mm)"
    try:
        q = torch.randint(-127, 128, (5, 32), dtype=torch.int8)
        if not _int8_sums_exact(int8_gemm(), q, torch.randint(-63, 64, (8, 32), dtype=torch.int8)):
            return "torch's int8 GEMM gave inexact sums on a trial"
    except RuntimeError as e:
        return f"torch's int8 GEMM failed a trial ({e})"
    return None


def int8_time_ratio(pairs: list[tuple[nn.Linear, Int8Linear]], dtype: torch.dtype, rows: int = 2048,
                    repeats: int = 5) -> float:
    """How many times as long each pair's :class:`Int8Linear` takes as its float layer cast to ``dtype`` (on
    :func:`project`'s GEMM, oneDNN's where it runs ``dtype``), all pairs one after the other on ``rows`` random
    rows: the median of ``repeats`` rounds, after one round that builds the kernels. Above 1: int8 is the slower
    here. No activation on either side. The pairs' layers are left as they were (a ``dtype`` copy of each float
    layer is timed).

    On a CPU with AMX a bf16 GEMM is fast enough that an int8 layer's extra passes (each row's levels, the sums
    back to float32) cost more than its int8 GEMM saves: MiniLM's four layer shapes on a 2-core AMX Xeon, 1.32x
    at start-up (fused levels); over HTTP the int8 server made 18.2k tokens/s against 27.1k in bf16."""
    backend = "onednn" if _onednn_works(dtype) else "torch"
    timed = [(q, layer.weight.detach().to(dtype), None if layer.bias is None else layer.bias.detach().to(dtype),
              torch.randn(rows, layer.in_features)) for layer, q in pairs]
    spent: dict[str, list[float]] = {"int8": [], "float": []}
    for _ in range(repeats + 1):
        for name in spent:
            start = time.perf_counter()
            for q, weight, bias, x in timed:
                if name == "int8":
                    q(x)
                else:  # the cast to dtype is part of a float layer's cost, as in project()
                    linear(x.to(dtype), weight, bias, "none", backend)
            spent[name].append(time.perf_counter() - start)
    return statistics.median(spent["int8"][1:]) / max(statistics.median(spent["float"][1:]), 1e-12)


def quantize_int8(module: nn.Module, input_absmax: dict[nn.Linear, torch.Tensor], *, weight_max: int,
                  gemm: str | None = None, fused: bool = False) -> int:
    """Replace the ``nn.Linear`` layers inside ``module`` by :class:`Int8Linear`, smoothed by their calibration
    statistics where ``input_absmax`` has them (:meth:`LinearPlan.calibrate`); returns how many.

    The layers that narrow (more inputs than outputs: an MLP's output projection, whose inputs after the
    activation span the widest range and are mostly positive) take unsigned activations on oneDNN's GEMM: 8-bit
    with VNNI; 7-bit without, with 8-bit weights where the others get 7 (MiniLM's worst cosine vs float32 with
    7-bit weights elsewhere: 0.988 with 7-bit weights there too, 0.992 unsigned, 0.996 float). With ``_int_mm``
    they are signed with 8-bit weights (VNNI) or stay float (no VNNI). ``fused``: the layers run the fused passes
    (pass it only where :func:`int8_fusion_problem` answered None)."""
    gemm = gemm or int8_gemm()
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            absmax = input_absmax.get(child)
            if child.in_features <= child.out_features or (weight_max == 127 and gemm != "onednn"):
                q = Int8Linear(child, absmax, weight_max=weight_max, gemm=gemm, fused=fused)
            elif gemm == "onednn":
                q = Int8Linear(child, absmax, weight_max=127, gemm=gemm, unsigned=True,
                               steps=254 if weight_max == 127 else 127, fused=fused)
            else:
                continue
            setattr(parent, name, q)
            count += 1
    return count


# A shape is judged on a call of at least this many rows (the warm-up's full step); smaller first calls use
# the default backend without deciding.
_PROBE_MIN_ROWS = 256
_PROBE_REPEATS = 3
# F.linear replaces the default only when this much faster: near-ties keep the default, so that restarts on a
# noisy host mostly run the same kernels (and give bit-identical vectors).
_PROBE_MARGIN = 1.1


class LinearPlan:
    """Which backend runs each linear layer. ``probe``: on the first call of each (out, in, activation, dtype)
    with enough rows, time the default backend and ``F.linear`` on that very input; ``F.linear`` takes the shape
    when it is clearly (10%) faster. ``chosen`` keeps each choice and its speed-up over the other (below 1 for a
    default kept within the margin)."""

    def __init__(self, default: str = "torch", probe: bool = False) -> None:
        self.default = default
        self.probe = probe and default != "torch"
        self.chosen: dict[tuple, tuple[str, float]] = {}  # key -> (backend, its speed-up over the other)
        self.absmax: dict[nn.Linear, torch.Tensor] | None = None  # while calibrating

    @contextlib.contextmanager
    def calibrate(self) -> Iterator[dict[nn.Linear, torch.Tensor]]:
        """Within: every ``nn.Linear`` run records the largest magnitude each of its input channels takes."""
        self.absmax = {}
        try:
            yield self.absmax
        finally:
            self.absmax = None

    def _observe(self, x: torch.Tensor, layer: nn.Linear) -> None:
        m = x.detach().abs().amax(dim=0).float()
        seen = self.absmax.get(layer)
        self.absmax[layer] = m if seen is None else torch.maximum(seen, m)

    def backend(self, x: torch.Tensor, layer: nn.Linear, act: str) -> str:
        if not self.probe:
            return self.default
        key = (layer.out_features, layer.in_features, act, x.dtype)
        hit = self.chosen.get(key)
        if hit is not None:
            return hit[0]
        if x.shape[0] < _PROBE_MIN_ROWS:
            return self.default
        times = {self.default: [], "torch": []}
        for _ in range(_PROBE_REPEATS + 1):  # the first round builds the kernels and is not counted
            for name, runs in times.items():
                start = time.perf_counter()
                linear(x, layer.weight, layer.bias, act, name)
                runs.append(time.perf_counter() - start)
        med = {name: statistics.median(runs[1:]) for name, runs in times.items()}
        if med["torch"] * _PROBE_MARGIN < med[self.default]:
            self.chosen[key] = ("torch", med[self.default] / max(med["torch"], 1e-12))
        else:
            self.chosen[key] = (self.default, med["torch"] / max(med[self.default], 1e-12))
        return self.chosen[key][0]

    def describe(self) -> str:
        if not self.probe:
            return self.default
        if not self.chosen:
            return f"{self.default} (no shape measured yet)"
        parts = []
        for (n_out, n_in, act, _), (name, gain) in sorted(self.chosen.items(), key=lambda kv: kv[0][:2]):
            layer = f"{n_in}->{n_out}" + ("" if act in ("none", "identity") else f"+{act}")
            parts.append(f"{layer} {name} ({gain:.2f}x)")
        return "measured per shape: " + ", ".join(parts)


def gemm_weights_to(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the ``nn.Linear`` layers inside ``module`` (weights and biases) to ``dtype``, nothing else; returns how
    many. :func:`project` casts their inputs to match, so the GEMMs run in ``dtype`` over a wider residual stream."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        layer.to(dtype)
    return len(layers)


def granular_rows(rows: int) -> int:
    """``rows`` rounded up to a granule that grows with it: multiples of 16 below 512, then 16 sizes per doubling
    (at most 1/16 more rows)."""
    granule = max(16, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // granule) * granule


def _with_rows(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, K]`` in ``dtype`` whose first ``x.shape[0]`` rows are ``x``'s, the others finite: zeros, or what an
    earlier :func:`project` computed from its own (the caller drops their outputs). Such an earlier output, cut
    (marked with the rows behind it), is read in place, without a copy.

    Never uninitialised memory: with an inner size that is not a multiple of its block (74, say) oneDNN's bf16
    GEMM reads each row a little past its end, into the next row, times zero weights. That changes nothing while
    the next row is finite; a NaN or an infinity there (as uninitialised memory may hold) made the last real row
    NaN."""
    K = x.shape[1]
    if x.dtype == dtype and getattr(x, "_rows_behind", 0) >= rows:
        return x.as_strided((rows, K), (K, 1))
    out = torch.empty(rows, K, dtype=dtype, device=x.device)
    out[: x.shape[0]].copy_(x)  # the cast to the weights' dtype, if any, happens here
    out[x.shape[0] :].zero_()
    return out


def _int8_levels(levels: torch.Tensor) -> torch.Tensor:
    """``levels`` on :func:`granular_rows` rows, integer-valued floats cast to int8 (the eager passes'), integer
    levels as they are (the fused pass's): the int8 GEMM's kernels are built per row count too (see
    :func:`project`)."""
    dtype = levels.dtype if levels.dtype in (torch.int8, torch.uint8) else torch.int8
    return _with_rows(levels, granular_rows(levels.shape[0]), dtype)


def project(x: torch.Tensor, layer: nn.Module, act: str = "none", plan: LinearPlan | None = None) -> torch.Tensor:
    """``act(layer(x))`` for a model's ``nn.Linear`` (through the plan's backend for its shape) or
    :class:`Int8Linear`. An input wider than the layer's weights (float32 into bf16 GEMMs: :func:`gemm_weights_to`)
    is cast to them, and the output stays in their dtype.

    On the CPU the GEMM runs on :func:`granular_rows` rows. oneDNN builds a kernel for each shape it meets and
    caches it; a packed step has a new token count almost every time, and building costs more than the GEMM on
    some CPUs (AVX-512 + AMX Xeon, bf16: 7 ms for MiniLM's 384->1536 at 4,000 rows, 14 ms with GELU fused,
    against 2-3 ms to run it). Rounded up, the counts repeat and the cache holds them."""
    if isinstance(layer, Int8Linear):
        return layer(x, act)
    rows = x.shape[0]
    if x.device.type == "cpu" and x.dim() == 2:
        x = _with_rows(x, granular_rows(rows), layer.weight.dtype)
    elif x.dtype != layer.weight.dtype:
        x = x.to(layer.weight.dtype)
    if plan is not None and plan.absmax is not None:
        plan._observe(x[:rows], layer)
    backend = "torch" if plan is None else plan.backend(x, layer, act)
    y = linear(x, layer.weight, layer.bias, act, backend)
    if y.shape[0] == rows:
        return y
    cut = y[:rows]
    cut._rows_behind = y.shape[0]  # its storage holds that many rows, the extra ones finite (_with_rows)
    return cut

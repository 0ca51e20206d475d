"""Backend choices measured against each other in one run: varlen attention and the linear kernel.

    python benchmarks/bench_kernels.py [--dtype float32] [--tokens 4096]

Attention: the mixed corpus's length distribution packed into one step, every CPU backend, median ms per
call and the ratio to the per-sequence loop. Linear: BERT-base-like shapes, ``onednn`` vs ``F.linear``. int8
layers (``--quantize int8``) at MiniLM's shapes: their input levels from the eager passes vs the one compiled pass
(:mod:`embedserve.kernels.int8_passes`, where inductor builds it here).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from embedserve.engine import compute
from embedserve.kernels.attention import prepare, usable_backends, varlen_attention
from embedserve.kernels.linear import linear, select_linear_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_line, median_ms  # noqa: E402


SHAPES = {
    "mixed": lambda rng: rng.choice([rng.randint(5, 16), rng.randint(80, 120), rng.randint(20, 70), 256]),
    "queries": lambda rng: rng.randint(5, 16),
    "passages": lambda rng: rng.randint(20, 120),
}


def corpus_lengths(tokens: int, shape: str, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out, total = [], 0
    while True:
        n = SHAPES[shape](rng)
        if total + n > tokens:
            return out
        out.append(n)
        total += n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    print(cpu_line())
    # Everything on the engine's compute thread, as a CPU server runs its kernels: one thread of this process runs
    # torch's parallel work (a second OpenMP team slows both; embedserve.engine.compute), and its allocator arena
    # settles (on the main thread a fresh 25 MB GELU output can page-fault on every call).
    compute.call(lambda: measure(args))


def measure(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")

    for shape in SHAPES:
        lengths = corpus_lengths(args.tokens, shape)
        T, H, D = sum(lengths), 12, 32
        q, k, v = (torch.randn(T, H, D).to(dtype) for _ in range(3))
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        print(f"attention, {shape}: {len(lengths)} sequences, {T} tokens, {H} heads of {D}")
        results = {}
        for backend in usable_backends(cpu, dtype):
            if backend == "dense" and shape != "mixed":
                continue
            # prepare() runs once per pass, attention once per layer: time both, as a 6-layer pass would.
            results[backend] = median_ms(
                lambda: [varlen_attention(q, k, v, m) for m in [prepare(backend, cu, max(lengths))] for _ in range(6)]
            ) / 6
        base = results["sdpa_segments"]
        for backend, ms in results.items():
            print(f"  {backend:15s} {ms:8.2f} ms/layer   {base / ms:5.2f}x vs sdpa_segments")

    chosen = select_linear_backend(cpu, dtype)
    print(f"linear ({chosen} chosen for {args.dtype}):")
    for n_in, n_out in [(768, 2304), (768, 3072), (3072, 768), (384, 1536)]:
        x = torch.randn(args.tokens, n_in).to(dtype)
        w = (torch.randn(n_out, n_in) / n_in**0.5).to(dtype)
        b = torch.randn(n_out).to(dtype)
        t_torch = median_ms(lambda: linear(x, w, b, "gelu", backend="torch"))
        t_fast = median_ms(lambda: linear(x, w, b, "gelu", backend=chosen))
        print(f"  [{args.tokens}x{n_in}] -> {n_out} + gelu: torch {t_torch:7.2f} ms, {chosen} {t_fast:7.2f} ms,"
              f" {t_torch / t_fast:5.2f}x")
    int8_layers(args.tokens)


def int8_layers(tokens: int) -> None:
    """MiniLM's int8 layer shapes, levels from eager passes vs the fused pass, on float32 inputs as the engine
    gives them (the down projection's after a GELU, unsigned where the GEMM is oneDNN's)."""
    from embedserve.kernels.linear import Int8Linear, int8_available, int8_fusion_problem, int8_gemm

    if (why := int8_available() or int8_fusion_problem()) is not None:
        print(f"int8 layers: not measured: {why}")
        return
    gemm = int8_gemm()
    print(f"int8 layers ({gemm} GEMM), levels from eager passes vs the fused pass:")
    for n_in, n_out, act in [(384, 1152, "none"), (384, 1536, "gelu"), (1536, 384, "none")]:
        layer = torch.nn.Linear(n_in, n_out)
        x = torch.randn(tokens, n_in)
        unsigned = n_in > n_out and gemm == "onednn"
        if unsigned:
            x = torch.nn.functional.gelu(x)
        kw = dict(gemm=gemm, unsigned=unsigned, steps=254 if unsigned else 127)
        eager = Int8Linear(layer, x.abs().amax(dim=0), **kw)
        fused = Int8Linear(layer, x.abs().amax(dim=0), fused=True, **kw)
        t_eager = median_ms(lambda: eager(x, act), 15)
        t_fused = median_ms(lambda: fused(x, act), 15)
        print(f"  [{tokens}x{n_in}] -> {n_out}{' + ' + act if act != 'none' else ''}"
              f"{', unsigned' if unsigned else ''}: eager {t_eager:7.2f} ms, fused {t_fused:7.2f} ms,"
              f" {t_eager / t_fused:5.2f}x")


if __name__ == "__main__":
    main()

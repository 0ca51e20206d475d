"""The fused pool+encode kernel: bandwidth against the device's own copy bandwidth, and its share of a pass.

    python benchmarks/bench_pool_encode.py [--tokens 65536] [--hidden 1024] [--batch 512] [--dtype bfloat16]

On CUDA: Triton ``do_bench`` times of the kernel and of its torch twin on the same inputs, GB/s read+written
by the kernel vs a measured device-to-device copy, and kernel time as a share of a BERT-base-shaped forward
pass (random weights) over the same packed tokens. On CPU: the twin alone, and its share of the forward pass
at a CPU-sized token count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from embedserve.kernels.attention import select_backend
from embedserve.kernels.linear import LinearPlan, select_linear_backend
from embedserve.kernels.pool_encode import (
    ENCODINGS,
    encoded_lengths,
    pool_encode_torch,
    pool_encode_triton,
    triton_available,
)
from embedserve.models.bert import BertArgs, BertModel
from embedserve.models.encoder import Kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_line, median_ms  # noqa: E402


def timed_ms(fn, device: torch.device, repeats: int = 5) -> float:
    if device.type == "cuda" and triton_available():
        from triton.testing import do_bench

        return do_bench(fn)
    return median_ms(fn, repeats)


def segments(tokens: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=g)[: batch - 1].sort().values + 1
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])]).to(torch.int32).to(device)


def measure(T: int, H: int, B: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The kernel's and the twin's times, GB/s against a device copy, and the share of a BERT-base-shaped
    forward pass over the same tokens. Also what benchmarks/gpu_check.py reports."""
    B = min(B, T)
    hidden = torch.randn(T, H, device=device).to(dtype)
    cu = segments(T, B, device)
    dims = torch.full((B,), H, dtype=torch.int32, device=device)
    ones = torch.ones(B, dtype=torch.bool, device=device)
    out: dict = {"device": device.type, "tokens": T, "hidden": H, "rows": B, "dtype": str(dtype).removeprefix("torch.")}
    out["twin_ms"] = timed_ms(lambda: pool_encode_torch(hidden, cu, "mean", dims, ones, ones), device)
    moved = T * H * hidden.element_size() + B * H * 4 + int(encoded_lengths(dims, ones).sum())
    out["bytes_moved"] = moved
    if device.type == "cuda" and triton_available():
        out["kernel_ms"] = timed_ms(lambda: pool_encode_triton(hidden, cu, "mean", dims, ones, ones), device)
        src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timed_ms(lambda: dst.copy_(src), device)
        out["copy_gbs"] = 2 * src.numel() / copy_ms / 1e6
        out["kernel_gbs"] = moved / out["kernel_ms"] / 1e6
        out["kernel_share_of_copy"] = out["kernel_gbs"] / out["copy_gbs"]
        del src, dst
        # The integer output types in the same launch (issue 27): int8 with ranges, ubinary.
        ranges = torch.stack([-torch.ones(H), torch.ones(H)]).unsqueeze(0).to(device)
        rows = torch.zeros(B, dtype=torch.int32, device=device)
        for name in ("int8", "ubinary"):
            codes = torch.full((B,), ENCODINGS[name], dtype=torch.int32, device=device)
            out[f"kernel_{name}_ms"] = timed_ms(lambda: pool_encode_triton(
                hidden, cu, "mean", dims, ones, codes, ranges=ranges, range_rows=rows), device)

    # A BERT-base-shaped encoder (12 layers, 768 wide, 12 heads) over the same packed tokens.
    bert = BertArgs(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    max_position_embeddings=max(512, T // B * 4), type_vocab_size=2, layer_norm_eps=1e-12,
                    hidden_act="gelu", position_offset=0)
    kernels = Kernels(attention=select_backend(device, "auto", dtype, bert.attention_shape),
                      linear=LinearPlan(select_linear_backend(device, dtype)))
    model = BertModel(bert, kernels).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # the meta-free init leaves garbage: keep activations finite
    ids = torch.randint(0, 30522, (T,), device=device)
    lengths = (cu[1:] - cu[:-1]).long()
    positions = torch.arange(T, device=device) - torch.repeat_interleave(cu[:-1].long(), lengths)
    host_lengths = lengths.tolist()
    max_len = max(host_lengths)
    if max_len > bert.max_position_embeddings:
        return out
    with torch.inference_mode():
        out["forward_ms"] = timed_ms(lambda: model(ids, positions, cu, max_len, lengths=host_lengths), device, repeats=3)
    out["attention"] = kernels.attention
    spent = out.get("kernel_ms", out["twin_ms"])
    out["share_of_forward"] = spent / out["forward_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="default: 65536 on CUDA, 4096 on CPU")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(cpu_line())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    T = args.tokens or (65536 if device.type == "cuda" else 4096)
    print(f"{device.type}: T={T}, H={args.hidden}, B={min(args.batch, T)}, {args.dtype}; mean pooling + normalise + "
          "base64 for every row")
    r = measure(T, args.hidden, args.batch, getattr(torch, args.dtype), device)
    if "kernel_ms" in r:
        print(f"copy bandwidth: {r['copy_gbs']:.0f} GB/s")
        print(f"triton kernel:  {r['kernel_ms']:.3f} ms, {r['kernel_gbs']:.0f} GB/s = "
              f"{100 * r['kernel_share_of_copy']:.0f}% of copy")
        print(f"torch twin:     {r['twin_ms']:.3f} ms ({r['twin_ms'] / r['kernel_ms']:.1f}x the kernel)")
        print(f"same launch, int8 instead of base64: {r['kernel_int8_ms']:.3f} ms; "
              f"ubinary: {r['kernel_ubinary_ms']:.3f} ms")
    else:
        print(f"torch twin:     {r['twin_ms']:.2f} ms ({r['bytes_moved'] / r['twin_ms'] / 1e6:.1f} GB/s); no CUDA: the "
              "Triton kernel is checked for correctness under TRITON_INTERPRET=1, not timed")
    if "forward_ms" not in r:
        print("segments longer than the position table; skipping the forward-pass share")
        return
    which = "kernel" if "kernel_ms" in r else "twin"
    print(f"BERT-base forward over the same tokens ({r['attention']}): {r['forward_ms']:.1f} ms; pool+encode "
          f"({which}) = {100 * r['share_of_forward']:.2f}% of it")


if __name__ == "__main__":
    main()

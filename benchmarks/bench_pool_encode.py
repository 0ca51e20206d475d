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
from embedserve.kernels.linear import select_linear_backend
from embedserve.kernels.pool_encode import b64_lengths, pool_encode_torch, pool_encode_triton, triton_available
from embedserve.models.bert import BertArgs, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402


def timed_ms(fn, device: torch.device, repeats: int = 5) -> float:
    if device.type == "cuda" and triton_available():
        from triton.testing import do_bench

        return do_bench(fn)
    return median_ms(fn, repeats)


def segments(tokens: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=g)[: batch - 1].sort().values + 1
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])]).to(torch.int32).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="default: 65536 on CUDA, 4096 on CPU")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    T = args.tokens or (65536 if device.type == "cuda" else 4096)
    H, B = args.hidden, min(args.batch, T)
    hidden = torch.randn(T, H, device=device).to(dtype)
    cu = segments(T, B, device)
    dims = torch.full((B,), H, dtype=torch.int32, device=device)
    ones = torch.ones(B, dtype=torch.bool, device=device)
    print(f"{device.type}: T={T}, H={H}, B={B}, {args.dtype}; mean pooling + normalise + base64 for every row")

    twin_ms = timed_ms(lambda: pool_encode_torch(hidden, cu, "mean", dims, ones, ones), device)
    moved = T * H * hidden.element_size() + B * H * 4 + int(b64_lengths(dims, ones).sum())
    kernel_ms = None
    if device.type == "cuda" and triton_available():
        kernel_ms = timed_ms(lambda: pool_encode_triton(hidden, cu, "mean", dims, ones, ones), device)
        src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timed_ms(lambda: dst.copy_(src), device)
        copy_gbs = 2 * src.numel() / copy_ms / 1e6
        kernel_gbs = moved / kernel_ms / 1e6
        print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
        print(f"triton kernel:  {kernel_ms:.3f} ms, {kernel_gbs:.0f} GB/s = {100 * kernel_gbs / copy_gbs:.0f}% of copy")
        print(f"torch twin:     {twin_ms:.3f} ms ({twin_ms / kernel_ms:.1f}x the kernel)")
    else:
        print(f"torch twin:     {twin_ms:.2f} ms ({moved / twin_ms / 1e6:.1f} GB/s); no CUDA: the Triton kernel is "
              "checked for correctness under TRITON_INTERPRET=1, not timed")

    # A BERT-base-shaped encoder (12 layers, 768 wide, 12 heads) over the same packed tokens.
    bert = BertArgs(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    max_position_embeddings=max(512, T // B * 4), type_vocab_size=2, layer_norm_eps=1e-12,
                    hidden_act="gelu", position_offset=0)
    model = BertModel(bert).to(device=device, dtype=dtype).eval()
    model.attention_backend = select_backend(device, "auto", dtype)
    model.linear_backend = select_linear_backend(device, dtype)
    ids = torch.randint(0, 30522, (T,), device=device)
    lengths = (cu[1:] - cu[:-1]).long()
    positions = torch.arange(T, device=device) - torch.repeat_interleave(cu[:-1].long(), lengths)
    max_len = int(lengths.max())
    if max_len > bert.max_position_embeddings:
        print("segments longer than the position table; skipping the forward-pass share")
        return
    with torch.inference_mode():
        forward_ms = timed_ms(lambda: model(ids, positions, cu, max_len), device, repeats=3)
    spent = kernel_ms if kernel_ms is not None else twin_ms
    which = "kernel" if kernel_ms is not None else "twin"
    print(f"BERT-base forward over the same tokens: {forward_ms:.1f} ms; pool+encode ({which}) = "
          f"{100 * spent / forward_ms:.2f}% of it")


if __name__ == "__main__":
    main()

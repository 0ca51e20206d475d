"""SPLADE pooling over packed tokens (kernels/sparse.py) against sentence-transformers' own ``SpladePooling`` on the
padded batch, and the Triton kernel against the torch twin: interpreted on CPU tensors, compiled on CUDA ones."""

from __future__ import annotations

import pytest
import torch

from embedserve.kernels.pool_encode import triton_available
from embedserve.kernels.sparse import splade_pool
from on_device import DEVICE

LENGTHS = [3, 1, 7, 4, 9]


def packed_logits(V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(sum(LENGTHS), V, generator=g) * 2  # about half of them negative: relu matters
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    return logits, cu


@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("activation", ["relu", "log1p_relu"])
def test_the_twin_is_sentence_transformers_splade_pooling_on_the_padded_batch(mode, activation):
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    V = 97
    logits, cu = packed_logits(V, seed=1)
    padded = torch.zeros(len(LENGTHS), max(LENGTHS), V)
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        padded[b, :n] = logits[cu[b] : cu[b + 1]]
        mask[b, :n] = 1
    st = SpladePooling(pooling_strategy=mode, activation_function=activation).eval()
    with torch.no_grad():
        want = st({"token_embeddings": padded.clone(), "attention_mask": mask})["sentence_embedding"]
    got = splade_pool(logits, lambda x: x, cu, V, mode, activation, block=4)  # blocks that split sequences
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got > 0).any() and (got == 0).any()  # sparse, and not trivially so


def test_the_head_sees_at_most_a_block_of_tokens():
    logits, cu = packed_logits(11, seed=2)
    seen = []

    def head(x):
        seen.append(x.shape[0])
        return x

    splade_pool(logits, head, cu, 11, "max", block=5)
    assert max(seen) == 5 and sum(seen) == logits.shape[0]


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("mode", ["max", "sum"])
@pytest.mark.parametrize("activation", ["relu", "log1p_relu"])
@pytest.mark.parametrize("V, block", [(1500, 4), (30, 64), (1024, 1)])
def test_the_triton_kernel_matches_the_twin(mode, activation, V, block):
    logits, cu = packed_logits(V, seed=V + block)
    logits, cu = logits.to(DEVICE), cu.to(DEVICE)
    want = splade_pool(logits, lambda x: x, cu, V, mode, activation, block=block, impl="torch")
    got = splade_pool(logits, lambda x: x, cu, V, mode, activation, block=block, impl="triton")
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)

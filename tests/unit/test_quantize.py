"""The integer output types against sentence-transformers' ``quantize_embeddings`` (the rules' reference) and
numpy's ``packbits``: binary equal, int8 / uint8 within 1 (it floors where we round), clipping at the range's ends
where values fall outside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers.util.quantization import quantize_embeddings

from embedserve.kernels.quantize import OUTPUT_TYPES, pack_bits, quantize, ranges_of


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, width, generator=g)
    return v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("width", [8, 16, 24, 384, 1024])
@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_binary_types_equal_sentence_transformers_and_packbits(kind, width):
    v = vectors(33, width, seed=width)
    v[0, :8] = torch.tensor([1.0, 0.0, -0.0, -1e-9, 1e-9, 0.5, -0.5, 0.0])  # zero is not positive
    got = quantize(v, kind)
    want = quantize_embeddings(v.numpy(), precision=kind)
    assert got.dtype == (torch.uint8 if kind == "ubinary" else torch.int8) and got.shape == (33, width // 8)
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(pack_bits(v).numpy(), np.packbits(v.numpy() > 0, axis=-1))
    assert got[0, 0].item() == (0b10001100 if kind == "ubinary" else 0b10001100 - 128)


@pytest.mark.parametrize("width", [13, 384])
@pytest.mark.parametrize("kind", ["int8", "uint8"])
def test_scalar_types_are_within_one_of_sentence_transformers_with_the_same_ranges(kind, width):
    calibration = vectors(1000, width, seed=1)
    ranges = ranges_of(calibration)
    v = vectors(64, width, seed=2)
    inside = torch.minimum(torch.maximum(v, ranges[0]), ranges[1])  # within the calibrated range
    got = quantize(inside, kind, ranges)
    want = quantize_embeddings(inside.numpy(), precision=kind, ranges=ranges.numpy())
    assert got.dtype == (torch.int8 if kind == "int8" else torch.uint8) and got.shape == (64, width)
    diff = np.abs(got.numpy().astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1
    assert diff.mean() > 0.2  # it floors, we round: about half the values differ by one
    # Rounded, not floored: each level is the nearest of the 256 evenly spaced values.
    lo, step = ranges[0], (ranges[1] - ranges[0]) / 255
    levels = got.to(torch.int32) + (128 if kind == "int8" else 0)
    assert ((lo + levels * step - inside).abs() <= step / 2 + 1e-6).all()


def test_values_outside_the_range_clip_to_its_ends_and_the_range_ends_map_to_them():
    ranges = torch.tensor([[-1.0, 0.0, 2.0], [1.0, 4.0, 2.0]])  # the last dimension's range is empty
    v = torch.tensor([[-5.0, 9.0, 2.0], [-1.0, 4.0, 7.0], [1.0, 0.0, -3.0]])
    assert quantize(v, "uint8", ranges).tolist() == [[0, 255, 0], [0, 255, 5], [255, 0, 0]]
    assert quantize(v, "int8", ranges).tolist() == [[-128, 127, -128], [-128, 127, -123], [127, -128, -128]]
    # The reference clips too (6.x), flooring: the range's top lands a float32 hair under 255 there.
    want = quantize_embeddings(v.numpy(), precision="uint8", ranges=ranges.numpy())
    assert want.tolist() == [[0, 255, 0], [0, 254, 5], [254, 0, 0]]


def test_a_vector_does_not_depend_on_its_batch():
    ranges = ranges_of(vectors(200, 32, seed=3))
    batch = vectors(10, 32, seed=4)
    for kind in OUTPUT_TYPES:
        together = quantize(batch, kind, ranges)
        alone = torch.cat([quantize(batch[i : i + 1], kind, ranges) for i in range(10)])
        assert torch.equal(together, alone), kind


def test_misuse_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        quantize(torch.randn(2, 12), "binary")
    with pytest.raises(ValueError, match=r"int8 output needs ranges of shape \(2, 4\), got None"):
        quantize(torch.randn(2, 4), "int8")
    with pytest.raises(ValueError, match="unknown output type 'int4'"):
        quantize(torch.randn(2, 8), "int4")
    with pytest.raises(ValueError, match="non-empty"):
        ranges_of(torch.empty(0, 4))

"""Every family offers the one Encoder protocol, and runs the kernels it was built with.

The engine chooses the kernels (attention backend, linear plan) from the folder's recipe before any weight is
read, and hands them to the family's constructor: nothing assigns them onto a built encoder any more.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from embedserve.kernels.linear import LinearPlan
from embedserve.models import registry
from embedserve.models.encoder import Encoder, EncoderBase, Kernels
from embedserve.models.sentence import build_model, read_model
from tiny import DECODERS, build_tiny_decoder, build_tiny_encoder

ENCODERS = ("bert", "xlm-roberta", "distilbert", "modernbert", "mpnet", "nomicbert", "gte")
CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class RecordingKernels(Kernels):
    """Kernels that note each attention batch the encoder asks them for."""

    calls: list = dataclasses.field(default_factory=list, compare=False)

    def attention_batch(self, cu_seqlens, max_seqlen, **kw):
        self.calls.append(kw)
        return super().attention_batch(cu_seqlens, max_seqlen, **kw)


class RecordingPlan(LinearPlan):
    """F.linear everywhere, counting the layers that asked."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.asked = 0

    def backend(self, x, layer, act):
        self.asked += 1
        return super().backend(x, layer, act)


def test_every_registered_family_is_an_encoder_base_built_with_kernels():
    families = {cls for _, cls in registry.ARCHITECTURES.values()} | {cls for _, cls in registry.REMOTE_CODE.values()}
    families |= {entry[1] for entry in registry.CLASSIFIERS.values()}
    assert len(families) == 8
    for cls in families:
        assert issubclass(cls, EncoderBase), cls
        assert "kernels" in cls.__init__.__code__.co_varnames, cls


def _build(path):
    recipe = read_model(path)
    kernels = RecordingKernels(attention="sdpa_bucketed", solo_min=64, linear=RecordingPlan())
    return recipe, build_model(recipe, dtype=torch.float32, device=CPU, kernels=kernels), kernels


def _run(encoder, lengths):
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ids = torch.randint(5, 1000, (sum(lengths),))
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        return encoder(ids, positions, cu, max(lengths), lengths=lengths)


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
def test_each_family_offers_the_protocol_and_runs_the_kernels_it_was_built_with(tmp_path, kind):
    if kind in ENCODERS:
        build_tiny_encoder(tmp_path, kind)
    else:
        build_tiny_decoder(tmp_path, kind)
    recipe, model, kernels = _build(tmp_path)
    encoder = model.encoder
    assert isinstance(encoder, Encoder)
    assert encoder.kernels is kernels
    # What the engine chose the kernels from, before the weights, is what the built encoder says it is.
    assert encoder.attention_shape == recipe.attention_shape
    assert encoder.supports_chunking == recipe.supports_chunking
    assert model.max_length == recipe.max_length <= encoder.max_length
    assert encoder.hidden_size == model.hidden_size
    assert encoder.embedding_rows > 0 and encoder.token_type_rows >= 0
    for old in ("attention_backend", "attention_solo_min", "linear_plan"):
        assert not hasattr(encoder, old), old
    hidden = _run(encoder, [3, 7, 2])
    assert hidden.shape == (12, encoder.hidden_size) and torch.isfinite(hidden).all()
    assert kernels.calls, "the encoder never asked its kernels for an attention batch"
    assert all(call.get("lengths") == [3, 7, 2] for call in kernels.calls)
    assert kernels.linear.asked >= 2 * len(encoder.layers)  # every layer's projections went through the plan


def test_the_same_weights_give_the_same_hidden_states_with_either_attention_kernel(tmp_path):
    build_tiny_encoder(tmp_path, "bert")
    recipe = read_model(tmp_path)
    dense = build_model(recipe, dtype=torch.float32, device=CPU)
    bucketed = build_model(recipe, dtype=torch.float32, device=CPU,
                           kernels=Kernels(attention="sdpa_bucketed", solo_min=4))
    assert dense.encoder.kernels == Kernels()
    torch.manual_seed(0)
    a = _run(dense.encoder, [3, 7, 2])
    torch.manual_seed(0)
    b = _run(bucketed.encoder, [3, 7, 2])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

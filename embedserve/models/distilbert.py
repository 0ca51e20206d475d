"""DistilBERT (msmarco-distilbert, multi-qa-distilbert, distiluse): BERT's post-norm encoder layer with no token
types and no pooler, under its own weight names, over packed tokens.

The layer is BERT's, computed by the same code (``bert.BertLayer``); what differs is the config's spelling,
the embeddings (word + position, then LayerNorm) and the checkpoint's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape
from embedserve.models.bert import BertArgs, BertModel
from embedserve.models.encoder import Kernels


@dataclass(frozen=True, kw_only=True)
class DistilBertArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    max_position_embeddings: int
    activation: str

    @classmethod
    def from_hf_config(cls, cfg: dict) -> DistilBertArgs:
        if cfg["dim"] % cfg["n_heads"]:
            raise ModelLoadError(f"dim {cfg['dim']} is not divisible by n_heads {cfg['n_heads']}")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["dim"],
            n_layers=cfg["n_layers"],
            n_heads=cfg["n_heads"],
            hidden_dim=cfg["hidden_dim"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            activation=cfg.get("activation", "gelu"),
        )

    def bert(self) -> BertArgs:
        # DistilBERT's LayerNorms use eps 1e-12, as BERT's; one (unused) token type row keeps BertModel's shape.
        return BertArgs(
            vocab_size=self.vocab_size, hidden_size=self.dim, num_layers=self.n_layers, num_heads=self.n_heads,
            intermediate_size=self.hidden_dim, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=1, layer_norm_eps=1e-12, hidden_act=self.activation, position_offset=0,
        )

    @property
    def max_length(self) -> int:
        return self.bert().max_length

    @property
    def attention_shape(self) -> AttentionShape:
        return self.bert().attention_shape


class DistilBertModel(BertModel):
    weight_prefixes = ("", "distilbert.")
    ignored_weights = (
        r"embeddings\.position_ids",
        r"vocab_transform\..*",
        r"vocab_layer_norm\..*",
        r"vocab_projector\..*",
        r"pre_classifier\..*",
        r"classifier\..*",
        r"qa_outputs\..*",
    )

    def __init__(self, args: DistilBertArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args.bert(), kernels)
        del self.token_type_embeddings  # DistilBERT has none

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)

    LAYER_PREFIX = "transformer.layer"
    LAYER_NAMES = {
        "qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        "attn_out": ("attention.out_lin",),
        "attn_norm": ("sa_layer_norm",),
        "up": ("ffn.lin1",),
        "down": ("ffn.lin2",),
        "mlp_norm": ("output_layer_norm",),
    }

"""Small pieces shared by the model files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.linear import ACTIVATIONS

# transformers' hidden_act names -> the kernel's activation names
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "identity": "identity",
    "linear": "identity",
}


def activation(name: str) -> str:
    """Validate a transformers activation name and return the kernel's name for it."""
    act = _HF_ACTIVATIONS.get(name)
    if act is None or act not in ACTIVATIONS:
        raise ModelLoadError(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(_HF_ACTIVATIONS))}"
        )
    return act


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, plus_one: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 as transformers does.

    ``plus_one``: Gemma's form, which scales by ``1 + weight`` in fp32 before casting back; the Llama form
    casts back first, then scales by ``weight``.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


class Embedding(nn.Module):
    """A lookup table with no initialisation: weights always come from the checkpoint. (nn.Embedding's
    random init, run on the meta device, would import ~150 MB of torch's decomposition modules.)"""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def attention_runs(windows, kind: str) -> str:
    """Per-layer attention as runs: "global causal x2, window 16 causal x1, global causal x1"."""
    runs: list[list] = []
    for w in windows:
        name = f"global {kind}" if w is None else f"window {w} {kind}"
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return ", ".join(f"{name} x{n}" for name, n in runs)

"""Small pieces shared by the model files."""

from __future__ import annotations

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

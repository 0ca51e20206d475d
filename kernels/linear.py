"""Linear layer with a fused activation, behind one function.

Backends, chosen once per (device, dtype) at start-up by :func:`select_linear_backend` and logged:

- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on CPU, bias and activation fused into the GEMM. On the
  2-core AVX-512 development machine it is about 2x faster than ``F.linear`` in fp32 at the shapes of a
  BERT-base layer (``benchmarks/bench_linear.py`` measures it), with the same fp32 accuracy.
- ``torch``: ``F.linear`` then the activation: the pure-torch twin, used on CUDA and as the test oracle.
"""

from __future__ import annotations

import logging
import os

# oneDNN compiles one primitive per GEMM shape and caches it (so does torch's ideep layer above it), and a packed
# server sees a new row count at nearly every step: with the default caches (1024 entries each, about 0.6 MB per
# entry) a CPU server grows by hundreds of MB as shapes come and go. 128 entries bound that; a miss costs one
# primitive creation (well under a millisecond, a few per step). Both are read at first use, so they are set on
# import; an operator's own values win. (0 is not an option: torch's LRU cache crashes with it.)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger(__name__)

# Our activation names -> (oneDNN post-op, its algorithm argument).
_ONEDNN_POSTOPS = {
    "none": ("none", ""),
    "identity": ("none", ""),
    "gelu": ("gelu", "none"),  # erf form
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}

_TORCH_ACTS = {
    "none": lambda x: x,
    "identity": lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

ACTIVATIONS = tuple(_TORCH_ACTS)


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name`` (one of :data:`ACTIVATIONS`) applied on its own, as a gated MLP applies it to its gate."""
    return _TORCH_ACTS[name](x)


def _onednn_works(dtype: torch.dtype) -> bool:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.randn(5, 7).to(dtype)
        w = torch.randn(3, 7).to(dtype)
        b = torch.randn(3).to(dtype)
        got = op(x, w, b, "gelu", [], "none")
        want = F.gelu(F.linear(x.float(), w.float(), b.float()))
    except RuntimeError:
        return False
    return bool(torch.allclose(got.float(), want, atol=5e-2, rtol=5e-2))


def select_linear_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    if requested == "torch" or device.type != "cpu":
        choice = "torch"
    elif _onednn_works(dtype):
        choice = "onednn"
    elif requested == "onednn":
        raise ValueError(f"the onednn linear backend does not run {dtype} on this CPU")
    else:
        choice = "torch"
    log.info("linear backend: %s (%s, %s)", choice, device.type, str(dtype).removeprefix("torch."))
    return choice


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none", backend: str = "torch"
) -> torch.Tensor:
    """``act(x @ weight.T + bias)``; x ``[T, in]``, weight ``[out, in]`` -> ``[T, out]``."""
    if backend == "onednn":
        post = _ONEDNN_POSTOPS.get(act)
        if post is not None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post[0], [], post[1])
        return _TORCH_ACTS[act](torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))
    return _TORCH_ACTS[act](F.linear(x, weight, bias))

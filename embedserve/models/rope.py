"""Rotary position embeddings as transformers computes them, for packed tokens.

Reads both config spellings: transformers 5's ``rope_parameters`` (optionally one dict per layer type) and
the older ``rope_theta`` + ``rope_scaling`` found in most published checkpoints. Supported scalings:
default, linear, llama3, and the fixed NTK-aware scaling of GTE v1.5's checkpoints (``{"type": "ntk"}``: the base
times the factor, every frequency divided by ``factor ** (2 / head_dim)``, at every length); anything else is
refused by name rather than silently computed wrong.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from embedserve.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "llama3", "ntk")


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_config(cls, cfg: dict, layer_type: str | None = None, *, theta_key: str = "rope_theta") -> RopeSpec:
        params = cfg.get("rope_parameters")
        if isinstance(params, dict) and layer_type is not None and layer_type in params:
            params = params[layer_type]
        if not isinstance(params, dict) or "rope_theta" not in params:
            params = {"rope_theta": cfg.get(theta_key, 10000.0), **(cfg.get("rope_scaling") or {})}
        kind = params.get("rope_type") or params.get("type") or "default"
        if kind not in ROPE_TYPES:
            raise ModelLoadError(f"RoPE scaling {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelLoadError("partial_rotary_factor other than 1.0 is not supported")
        if kind == "ntk" and params.get("mixed_b") is not None:
            raise ModelLoadError("RoPE scaling 'ntk' with mixed_b is not supported (only the fixed NTK form)")
        return cls(
            theta=float(params["rope_theta"]),
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
            ),
        )

    def describe(self) -> str:
        """The variant in words, for the start-up log."""
        base = f"base {self.theta:.0f}" if self.theta.is_integer() else f"base {self.theta:g}"
        if self.kind == "linear":
            return f"RoPE linear x{self.factor:g}, {base}"
        if self.kind == "ntk":
            return f"RoPE fixed NTK x{self.factor:g}, {base}"
        if self.kind == "llama3":
            return (f"RoPE llama3 x{self.factor:g} (low {self.low_freq_factor:g}, high {self.high_freq_factor:g}, "
                    f"original {self.original_max_position_embeddings}), {base}")
        return f"RoPE {base}"

    def inv_freq_on(self, head_dim: int, device: torch.device) -> torch.Tensor:
        """:meth:`inv_freq` on ``device``, computed once per (spec, head_dim, device), not every forward pass."""
        return _inv_freq_cached(self, head_dim, str(device))

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """``[head_dim / 2]`` float32 inverse frequencies, scaled as the config says."""
        theta = self.theta * self.factor if self.kind == "ntk" else self.theta
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.kind == "ntk":
            return inv / self.factor ** (2 / head_dim)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@functools.lru_cache(maxsize=64)
def _inv_freq_cached(spec: RopeSpec, head_dim: int, device: str) -> torch.Tensor:
    return spec.inv_freq(head_dim).to(device)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [T]`` -> cos, sin ``[T, 1, head_dim]`` in ``dtype`` (angles in fp32, as transformers does)."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [T, 1, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, d]`` rotated by position (the rotate-half convention of transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin

"""Strict safetensors loading through an explicit name map. Never unpickles.

A model declares ``weight_map() -> {our parameter name: (checkpoint name, ...)}`` (several names are
concatenated along dim 0, e.g. q/k/v into one fused projection) and ``ignored_weights`` (regexes for
checkpoint tensors it deliberately does not use, such as a pretraining head). Everything else is strict:
a missing, unexpected or mis-shaped tensor is a :class:`ModelLoadError` naming it.

Tensors are read one at a time straight into their final dtype and device, and assigned into a model
that was built on the meta device, so no second full copy of the weights ever exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from embedserve.errors import ModelLoadError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """A single ``model.safetensors`` or a sharded set with its index, opened lazily."""

    def __init__(self, directory: Path, *, file: str = WEIGHTS_FILE, index: str = WEIGHTS_INDEX) -> None:
        self.directory = directory
        single, indexed = directory / file, directory / index
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
            with safe_open(single, framework="pt") as f:
                for name in f.keys():
                    self._where[name] = single
        elif indexed.is_file():
            try:
                weight_map = json.loads(indexed.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{indexed} is not a safetensors index (no weight_map): {e}") from e
            self._where = {name: directory / shard for name, shard in weight_map.items()}
            files = set(self._where.values())
            for shard in files:
                if not shard.is_file():
                    raise ModelLoadError(f"shard {shard.name} named in {indexed.name} is missing from {directory}")
        else:
            pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
            hint = (
                f" (found {', '.join(sorted(pickled))}: pickled weights are never loaded; convert them to safetensors)"
                if pickled
                else ""
            )
            raise ModelLoadError(f"no {file} or {index} in {directory}{hint}")
        self._handles = {path: safe_open(path, framework="pt") for path in files}

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = self._handles[self._where[name]].get_tensor(name)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype=dtype)
        return tensor.to(device=device)


def _detect_prefix(names: set[str], wanted: Iterable[str], prefixes: tuple[str, ...]) -> str:
    wanted = list(wanted)
    best, best_hits = prefixes[0], -1
    for prefix in prefixes:
        hits = sum(prefix + w in names for w in wanted)
        if hits > best_hits:
            best, best_hits = prefix, hits
    return best


def _assign(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_weights(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    weight_map: dict[str, tuple[str, ...]],
    *,
    ignored: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = ("",),
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill every parameter of ``model`` (built on the meta device) from ``checkpoint``."""
    expected = dict(model.named_parameters())
    unmapped = sorted(set(expected) - set(weight_map))
    if unmapped:
        raise ModelLoadError(f"this is a bug: no checkpoint name for parameters {unmapped}")

    names = checkpoint.names()
    flat_wanted = [n for sources in weight_map.values() for n in sources]
    prefix = _detect_prefix(names, flat_wanted, prefixes)
    ignore_res = [re.compile(p) for p in ignored]
    where = checkpoint.directory

    missing = [prefix + n for n in flat_wanted if prefix + n not in names]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint in {where} is missing tensor(s): {shown}")
    used = {prefix + n for n in flat_wanted}
    unexpected = sorted(
        n for n in names - used if not any(r.fullmatch(n[len(prefix):] if n.startswith(prefix) else n) for r in ignore_res)
    )
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise ModelLoadError(f"checkpoint in {where} has unexpected tensor(s): {shown}")

    for ours, sources in weight_map.items():
        want = tuple(expected[ours].shape)
        shapes = [checkpoint.shape(prefix + s) for s in sources]
        got = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
        if len(shapes) > 1 and any(s[1:] != shapes[0][1:] for s in shapes):
            got = tuple(shapes)  # cannot be concatenated: report them all
        if got != want:
            raise ModelLoadError(
                f"tensor {', '.join(prefix + s for s in sources)} in {where} has shape {got}, "
                f"the model's configuration expects {want}"
            )
        parts = [checkpoint.read(prefix + s, dtype, device) for s in sources]
        _assign(model, ours, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
        del parts

    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelLoadError(f"this is a bug: parameters left unloaded: {still_meta}")

"""Strict safetensors loading through an explicit name map. Never unpickles.

A model declares ``weight_map() -> {our parameter name: (checkpoint name, ...)}`` (several names are
concatenated along dim 0, e.g. q/k/v into one fused projection) and ``ignored_weights`` (regexes for
checkpoint tensors it deliberately does not use, such as a pretraining head). A family published in more than
one spelling (transformers' native names and a remote-code original) declares ``weight_maps()``, a list; the
spelling and prefix that name the most of the checkpoint's tensors are used, and then everything is strict:
a missing, unexpected or mis-shaped tensor is a :class:`ModelLoadError` naming it.

Tensors are read one at a time with plain file reads (no memory map) straight into their final dtype and
device, and assigned into a model that was built on the meta device, so no second full copy of the weights
ever exists: peak host memory while loading stays close to the checkpoint's size.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from embedserve.errors import ModelLoadError, quoted


def read_json(path: Path) -> dict | list:
    """A JSON file of a model folder; missing or broken is a ModelLoadError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"missing file {path}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None

def inside(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` for a path a folder's own JSON names (a module's folder, a weight shard), refused
    unless it stays inside the folder: relative, no ``..``, and resolved (symlinks followed) within the folder, or
    within its Hugging Face cache repository for a cache snapshot, whose files link to the repository's blobs."""
    if not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in Path(name).parts:
        raise ModelLoadError(f"{what} names {quoted(name)}, which is not a path inside the model folder {directory}")
    path = directory / name
    real = path.resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>/
        roots.append(directory.parent.parent.resolve())
    if not any(real == root or root in real.parents for root in roots):
        raise ModelLoadError(f"{what} names {quoted(name)}, which leads out of the model folder {directory} "
                             f"(to {real})")
    return path


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# safetensors dtype names -> torch dtypes (the format is little-endian, as are the hosts we run on)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """The safetensors header: an 8-byte little-endian length, then JSON naming every tensor's bytes."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 1024 * 1024:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        file_size = path.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name} has a malformed header entry {info!r}") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or 8 + size + end > file_size:
            raise ModelLoadError(f"{path}: tensor {name} ({info['dtype']} {list(shape)}) has a wrong byte range")
        entries[name] = _Entry(path, dtype, shape, 8 + size + begin, end - begin)
    return entries


_LEGACY_NORM = ("LayerNorm.gamma", "LayerNorm.beta")


class SafetensorsCheckpoint:
    """A single ``model.safetensors`` or a sharded set with its index.

    Tensors are read with plain file reads straight into their destination tensor: no memory map, so a
    loaded model holds its weights once, not once more in mapped file pages.
    """

    def __init__(self, directory: Path, *, file: str = WEIGHTS_FILE, index: str = WEIGHTS_INDEX) -> None:
        self.directory = directory
        single, indexed = directory / file, directory / index
        if single.is_file():
            self._entries = _read_header(single)
        elif indexed.is_file():
            try:
                weight_map = json.loads(indexed.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{indexed} is not a safetensors index (no weight_map): {e}") from e
            self._entries = {}
            for shard in sorted(set(weight_map.values()), key=str):
                path = inside(directory, shard, indexed.name)
                if not path.is_file():
                    raise ModelLoadError(f"shard {shard} named in {indexed.name} is missing from {directory}")
                for name, entry in _read_header(path).items():
                    if weight_map.get(name) == shard:
                        self._entries[name] = entry
            absent = sorted(set(weight_map) - set(self._entries))
            if absent:
                raise ModelLoadError(f"{indexed.name} names tensors its shards do not hold: {', '.join(absent[:8])}")
        else:
            pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
            hint = (
                f" (found {', '.join(sorted(pickled))}: pickled weights are never loaded; convert them to safetensors)"
                if pickled
                else ""
            )
            raise ModelLoadError(f"no {file} or {index} in {directory}{hint}")
        # TensorFlow-era BERT spellings, which transformers still writes for BERT (5.x) and reads back as weight /
        # bias: a LayerNorm's gamma and beta.
        for name in [n for n in self._entries if n.endswith(_LEGACY_NORM)]:
            new = name[: -len(".gamma")] + ".weight" if name.endswith(".gamma") else name[: -len(".beta")] + ".bias"
            if new not in self._entries:
                self._entries[new] = self._entries.pop(name)

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read_rows(self, name: str, rows: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Only the given rows (along dim 0) of a tensor, read by seeking: two rows of a 150k-token LM head
        without reading the rest."""
        e = self._entries[name]
        per_row = e.nbytes // e.shape[0]
        out = torch.empty((len(rows), *e.shape[1:]), dtype=e.dtype)
        raw = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(e.path, "rb") as f:
            for i, r in enumerate(rows):
                if not 0 <= r < e.shape[0]:
                    raise ModelLoadError(f"row {r} of tensor {name} (shape {list(e.shape)}) does not exist")
                f.seek(e.offset + r * per_row)
                if f.readinto(raw[i * per_row : (i + 1) * per_row]) != per_row:
                    raise ModelLoadError(f"{e.path}: tensor {name} is truncated")
        return out.to(dtype)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor ``out`` (the tensor's shape; any float dtype) from the file."""
        e = self._entries[name]
        direct = out.dtype == e.dtype
        target = out if direct else torch.empty(e.shape, dtype=e.dtype)  # one tensor's worth of staging
        if e.nbytes:
            with open(e.path, "rb") as f:
                f.seek(e.offset)
                if f.readinto(memoryview(target.view(-1).view(torch.uint8).numpy())) != e.nbytes:
                    raise ModelLoadError(f"{e.path}: tensor {name} is truncated")
        if not direct:
            out.copy_(target)


def _flat(weight_map: dict[str, tuple[str, ...]]) -> list[str]:
    return [n for sources in weight_map.values() for n in sources]


def _best_spelling(
    names: set[str], maps: Sequence[dict[str, tuple[str, ...]]], prefixes: tuple[str, ...]
) -> tuple[dict[str, tuple[str, ...]], str]:
    """The (name map, prefix) pair that finds the largest share of its names in the checkpoint; ties go to
    the earlier map and prefix."""
    best, best_score = (maps[0], prefixes[0]), -1.0
    for weight_map in maps:
        wanted = _flat(weight_map)
        for prefix in prefixes:
            score = sum(prefix + w in names for w in wanted) / max(len(wanted), 1)
            if score > best_score:
                best, best_score = (weight_map, prefix), score
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
    weight_map: dict[str, tuple[str, ...]] | Sequence[dict[str, tuple[str, ...]]],
    *,
    ignored: tuple[str, ...] = (),
    prefixes: tuple[str, ...] = ("",),
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill every parameter of ``model`` (built on the meta device) from ``checkpoint``. ``weight_map``: one
    name map, or the spellings the family is published in."""
    maps = [weight_map] if isinstance(weight_map, dict) else list(weight_map)
    expected = dict(model.named_parameters())
    for m in maps:
        unmapped = sorted(set(expected) - set(m))
        if unmapped:
            raise ModelLoadError(f"this is a bug: no checkpoint name for parameters {unmapped}")

    names = checkpoint.names()
    weight_map, prefix = _best_spelling(names, maps, prefixes)
    flat_wanted = _flat(weight_map)
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
        # Read every part straight into its rows of the final tensor: no concatenation copies.
        host = torch.empty(want, dtype=dtype)
        row = 0
        for source, shape in zip(sources, shapes):
            checkpoint.read_into(prefix + source, host[row : row + shape[0]])
            row += shape[0]
        _assign(model, ours, host if device.type == "cpu" else host.to(device))

    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelLoadError(f"this is a bug: parameters left unloaded: {still_meta}")

"""The engine's output types: the calibration behind int8 / uint8 (the built-in set, a file, once per model and
width), every encoding from both pool+encode implementations equal to the quantize rules on the engine's own
vectors, and ``truncate_start`` (Cohere's START) against transformers on encoders and decoders."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.calibration import BUILT_IN, OutputCalibration
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import ConfigError, InvalidRequest
from embedserve.kernels.pool_encode import encode_rows, triton_available
from embedserve.kernels.quantize import ranges_of
from on_device import model_config
from tiny import build_tiny_decoder, build_tiny_encoder, long_text, mixed_texts

ROOT = Path(__file__).resolve().parents[2]
TEXTS = mixed_texts(12, seed=31) + ["", "a"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-output-types")
    build_tiny_encoder(path, "bert", seed=12)
    return path


def test_the_built_in_set_is_over_a_thousand_varied_texts_and_its_script_rewrites_it_unchanged():
    calib = OutputCalibration.load(None)
    texts = calib.texts
    assert len(texts) >= 1000 and len(set(texts)) == len(texts)
    assert calib.source == f"{BUILT_IN}: {len(texts)} texts"
    lengths = sorted(len(t) for t in texts)
    assert lengths[0] <= 3 and lengths[-1] >= 500  # one word to several sentences
    scripts = {"Cyrillic": "\u0400", "CJK": "\u4e00", "Arabic": "\u0600", "Devanagari": "\u0900", "Hangul": "\uac00"}
    for name, first in scripts.items():
        base = ord(first)
        assert any(base <= ord(c) < base + 256 for t in texts for c in t), name
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_calibration_texts.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_calibration_file_that_cannot_be_read_or_is_empty_is_a_start_up_error(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*missing.txt"):
        Engine(EngineConfig(model=model_config(tiny_dir), int8_calibration=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no text"):
        Engine(EngineConfig(model=model_config(tiny_dir), int8_calibration=str(empty)))


@pytest.mark.parametrize("pool_kernel", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="triton is not installed"))])
def test_every_encoding_is_the_quantize_rules_on_the_engines_own_vectors(tiny_dir, tmp_path, caplog, pool_kernel):
    """Ranges: the minimum and maximum of the engine's own vectors of the calibration texts (cut, renormalised
    where the request normalises), measured once for every width; each encoding, first (made by the pool+encode
    pass) or later (made from the vectors), is :func:`encode_rows` of the float vectors the request returns."""
    calib_file = tmp_path / "calibration.txt"
    calib = mixed_texts(40, seed=5)
    calib_file.write_text("\n".join(calib) + "\n")
    caplog.set_level(logging.INFO, logger="embedserve.engine")
    engine = Engine(EngineConfig(model=model_config(tiny_dir, pool_kernel=pool_kernel),
                                 int8_calibration=str(calib_file)))
    engine.start()
    try:
        async def run():
            raw = (await engine.embed(calib, EmbedOptions(normalize=False))).vectors
            cases = [(32, None, ("int8", "ubinary", "base64", "uint8", "binary")), (16, None, ("uint8", "int8")),
                     (8, False, ("binary", "uint8")), (None, False, ("int8",)), (None, None, ("uint8", "base64"))]
            results = await asyncio.gather(*(engine.embed(TEXTS, EmbedOptions(dimensions=d, normalize=n,
                                                                              encodings=e)) for d, n, e in cases))
            return raw, cases, results

        raw, cases, results = asyncio.run(run())
        for (dims, normalize, encodings), result in zip(cases, results):
            k = dims or engine.dimensions
            cut = raw[:, :k]
            renormalise = normalize if normalize is not None else engine.model.spec.normalize or dims is not None
            if renormalise:
                cut = cut / cut.norm(dim=1, keepdim=True).clamp(min=1e-12)
            ranges = ranges_of(cut)
            assert set(result.encoded) == set(encodings)
            for name in encodings:
                assert result.encoded[name] == encode_rows(result.vectors, name, ranges), (dims, normalize, name)
        assert caplog.text.count("output ranges measured on") == 1, caplog.text
        assert "calibration.txt: 40 texts" in caplog.text
    finally:
        engine.shutdown()


def test_a_width_binary_cannot_pack_is_a_400_naming_it(tiny_dir):
    engine = Engine(EngineConfig(model=model_config(tiny_dir)))
    engine.start()
    try:
        with pytest.raises(InvalidRequest, match="multiple of 8.* 12") as err:
            asyncio.run(engine.embed(["x"], EmbedOptions(dimensions=12, encodings=("ubinary",))))
        assert err.value.param == "dimensions"
        with pytest.raises(InvalidRequest, match="unknown output type 'int4'"):
            asyncio.run(engine.embed(["x"], EmbedOptions(encodings=("int4",))))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["bert-encoder", "qwen3-decoder"])
def test_truncate_start_keeps_the_end_as_transformers_left_truncation(kind, tmp_path):
    """The start tokens, the input's last tokens, the end tokens: the ids transformers' left truncation keeps, run
    through its own forward (mean pooling for the encoder, the last token for the decoder)."""
    from transformers import AutoTokenizer

    if kind == "bert-encoder":
        model, pooling = build_tiny_encoder(tmp_path, "bert", seed=3), "mean"
    else:
        model, pooling = build_tiny_decoder(tmp_path, "qwen3", pooling="last", seed=3), "last"
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [long_text(3000, seed=1) + " the end", long_text(engine.max_length // 2, seed=2), "short"]
    assert len(texts[0]) > 16 * engine.max_length  # read as a tail, not whole
    try:
        got = asyncio.run(engine.embed(texts, EmbedOptions(truncate_start=True))).vectors
        head = asyncio.run(engine.embed(texts)).vectors
    finally:
        engine.shutdown()
    for side, vectors in (("left", got), ("right", head)):
        tok.truncation_side = side
        with torch.no_grad():
            for text, v in zip(texts, vectors):
                ids = tok(text, truncation=True, max_length=engine.max_length, return_tensors="pt")["input_ids"]
                hidden = model(input_ids=ids).last_hidden_state[0]
                want = hidden.mean(0) if pooling == "mean" else hidden[-1]
                torch.testing.assert_close(v, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], head[0], atol=1e-3)  # the long text's two ends differ

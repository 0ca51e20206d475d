"""Output types (int8, uint8, binary, ubinary) on /v1/embeddings and Cohere's embed API (/v2/embed, /v1/embed),
against a real server: every vector checked against sentence-transformers (its vectors, its quantize_embeddings,
the ranges of its own vectors of the calibration texts), driven by raw HTTP, the real ``cohere`` SDK and
langchain-cohere's ``CohereEmbeddings``."""

from __future__ import annotations

import base64
import re
from importlib import resources

import httpx
import numpy as np
import pytest

from serving import run_server
from tiny import long_text

TEXTS = ["The cat sits on the mat.", "Quarterly revenue rose 12%.", "def f(x): return x * 2",
         "Der Zug fährt um acht.", "🙂🙂🙂 zzzz qqqq", "a"]
# The calibration: the built-in set's first 300 texts (the whole set is tested in tests/models/test_output_ranges.py).
CALIBRATION = resources.files("embedserve.data").joinpath("calibration.txt").read_text().splitlines()[:300]
# Two copies of MiniLM under different prompts, for input_type.
PROMPTS_A = {"search_query": "sq: ", "query": "q: ", "document": "doc: ", "passage": "p: ", "clustering": "clu: ",
             "classification": ""}
PROMPTS_B = {"query": "q: ", "passage": "p: ", "classification": "cls: ", "other": "o: "}


def _toml_table(prompts: dict[str, str]) -> str:
    return "{ " + ", ".join(f'{k} = "{v}"' for k, v in prompts.items()) + " }"


@pytest.fixture(scope="module")
def served(tmp_path_factory, minilm_dir):
    tmp = tmp_path_factory.mktemp("output-types")
    calib = tmp / "calibration.txt"
    calib.write_text("\n".join(CALIBRATION) + "\n")
    config = tmp / "models.toml"
    config.write_text(
        f'[[model]]\nname = "a"\nmodel = "{minilm_dir}"\nprompts = {_toml_table(PROMPTS_A)}\n\n'
        f'[[model]]\nname = "b"\nmodel = "{minilm_dir}"\nprompts = {_toml_table(PROMPTS_B)}\n'
        'default_prompt_name = "other"\n'
    )
    with run_server(tmp, "--config", str(config), "--int8-calibration", str(calib),
                    "--reject-unknown-model") as server:
        yield server


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=120)


def st_vectors(st_embed, texts, dims=None):
    """sentence-transformers' vectors, cut to ``dims`` and renormalised (what ``dimensions`` returns)."""
    v = st_embed(texts).astype(np.float64)
    if dims is not None:
        v = v[:, :dims]
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v


def levels(v, lo, hi):
    """The rule written out independently: clip(round((v - lo) / ((hi - lo) / 255)), 0, 255)."""
    step = (hi - lo) / 255
    step[step == 0] = 1
    return np.clip(np.round((v - lo) / step), 0, 255)


@pytest.mark.parametrize("dims", [None, 128])
def test_integer_formats_follow_sentence_transformers_with_ranges_of_its_calibration_vectors(served, st_embed, dims):
    from sentence_transformers.util.quantization import quantize_embeddings

    ref = st_vectors(st_embed, TEXTS + CALIBRATION[:2], dims)  # two calibration texts: some values at the ends
    calib = st_vectors(st_embed, CALIBRATION, dims)
    ranges = np.stack([calib.min(0), calib.max(0)])
    lo, hi = ranges
    got = {}
    for fmt in ("int8", "uint8", "binary", "ubinary"):
        body = {"model": "a", "input": TEXTS + CALIBRATION[:2], "encoding_format": fmt}
        if dims:
            body["dimensions"] = dims
        r = post(served, "/v1/embeddings", body)
        assert r.status_code == 200, r.text
        got[fmt] = np.array([d["embedding"] for d in r.json()["data"]])
        assert all(isinstance(x, int) for x in r.json()["data"][0]["embedding"])
    width = dims or 384
    # binary: sentence-transformers' own function, bit for bit (values within 1e-5 of 0 could flip either way)
    for fmt in ("binary", "ubinary"):
        want = quantize_embeddings(ref, precision=fmt, ranges=ranges).astype(int)
        assert got[fmt].shape == (len(ref), width // 8)
        sure = np.packbits(np.abs(ref) > 1e-5, axis=-1) == 255  # bytes whose 8 values are all clear of 0
        assert (got[fmt][sure] == want[sure]).all(), fmt
    # uint8 / int8: the rule (rounding, clipping) within 1 of float noise; sentence-transformers' (which
    # truncates) within 1 wherever it does not wrap
    rule = levels(ref, lo, hi)
    assert np.abs(got["uint8"] - rule).max() <= 1
    assert np.abs(got["int8"] - (rule - 128)).max() <= 1
    assert (got["int8"] == got["uint8"] - 128).all()
    inside = (ref >= lo) & (ref <= hi)
    st_uint8 = quantize_embeddings(ref, precision="uint8", ranges=ranges).astype(int)
    assert np.abs(got["uint8"] - st_uint8)[inside].max() <= 1
    # the calibration texts' own values reach both ends; the others' stray past them and clip, never wrap
    assert (got["uint8"][-2:] == 0).any() and (got["uint8"][-2:] == 255).any()
    above, below = ref > hi + 1e-4, ref < lo - 1e-4
    assert above.any() and below.any(), "no value outside the ranges: the clipping is not tested"
    assert (got["uint8"][above] == 255).all() and (got["uint8"][below] == 0).all()


def test_one_calibration_per_model_whatever_the_width_and_the_log_names_the_set(served):
    for dims in (64, 96, 384):
        assert post(served, "/v1/embeddings", {"model": "a", "input": "x", "encoding_format": "uint8",
                                               "dimensions": dims}).status_code == 200
    log = served.output()
    assert re.search(r"a: int8 / uint8 output ranges calibrate on .*calibration\.txt: 300 texts", log)
    assert len(re.findall(r"\ba: int8 / uint8 output ranges measured on .*calibration\.txt: 300 texts", log)) == 1


def test_the_openai_client_takes_an_integer_format(served):
    from openai import OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key="unused")
    res = client.embeddings.create(model="a", input=TEXTS[:2], encoding_format="ubinary")
    raw = post(served, "/v1/embeddings", {"model": "a", "input": TEXTS[:2], "encoding_format": "ubinary"}).json()
    assert [d.embedding for d in res.data] == [d["embedding"] for d in raw["data"]]
    assert len(res.data[0].embedding) == 48


def test_format_and_width_errors_name_their_field(served):
    r = post(served, "/v1/embeddings", {"model": "a", "input": "x", "encoding_format": "binary", "dimensions": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions" and "100" in r.json()["error"]["message"]
    r = post(served, "/v1/embeddings", {"model": "a", "input": "x", "encoding_format": "int4"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
    assert "int8" in r.json()["error"]["message"] and "ubinary" in r.json()["error"]["message"]
    r = post(served, "/v2/embed", {"model": "a", "texts": ["x"], "embedding_types": ["binary"],
                                   "output_dimension": 20})
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_dimension" and "20" in r.text
    for body, param in (({"model": "a"}, "texts"), ({"model": "a", "texts": []}, "texts"),
                        ({"model": "a", "texts": ["x"], "embedding_types": ["int4"]}, "embedding_types"),
                        ({"model": "a", "texts": ["x"], "embedding_types": []}, "embedding_types"),
                        ({"model": "a", "texts": ["x"], "truncate": "MIDDLE"}, "truncate"),
                        ({"model": "a", "texts": ["x"], "input_type": "image"}, "input_type"),
                        ({"model": "a", "texts": ["x"], "images": ["data:image/png;base64,AA=="]}, "images"),
                        ({"model": "a", "texts": ["x"], "max_tokens": 8}, "max_tokens"),
                        ({"model": "a", "texts": ["x"], "output_dimension": 385}, "output_dimension"),
                        ({"model": "a", "texts": ["x"], "output_dimension": 0}, "output_dimension")):
        r = post(served, "/v2/embed", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    r = post(served, "/v1/embed", {"model": "nope", "texts": ["x"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_the_openapi_document_lists_the_types_and_cohere_routes(served):
    spec = httpx.get(served.url + "/openapi.json").json()
    fmt = spec["components"]["schemas"]["EmbeddingRequest"]["properties"]["encoding_format"]
    enum = fmt.get("enum") or [v for alt in fmt.get("anyOf", []) for v in alt.get("enum", [])]
    assert {"float", "base64", "int8", "uint8", "binary", "ubinary"} <= set(enum)
    assert "/v2/embed" in spec["paths"] and "/v1/embed" in spec["paths"]
    cohere = spec["components"]["schemas"]["CohereEmbedRequest"]["properties"]
    assert set(cohere["embedding_types"]["items"]["enum"]) == {"float", "int8", "uint8", "binary", "ubinary",
                                                               "base64"}


def test_cohere_v2_sdk_every_type_from_one_request(served, st_embed):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=served.url)
    res = co.embed(model="a", texts=TEXTS, input_type="search_query",
                   embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"])
    e = res.embeddings
    want = st_embed(["sq: " + t for t in TEXTS])
    np.testing.assert_allclose(np.array(e.float_), want, atol=2e-6)
    for i, b in enumerate(e.base64):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b), "<f4"), np.array(e.float_[i], np.float32))
    # each integer type as /v1/embeddings gives it alone (there made in the pool+encode pass, here beside it)
    for fmt in ("int8", "uint8", "binary", "ubinary"):
        alone = post(served, "/v1/embeddings", {"model": "a", "input": ["sq: " + t for t in TEXTS],
                                                "encoding_format": fmt}).json()
        assert getattr(e, fmt) == [d["embedding"] for d in alone["data"]], fmt
    assert res.texts == TEXTS and res.response_type == "embeddings_by_type"
    assert res.meta.api_version.version == "2"
    usage = post(served, "/v1/embeddings", {"model": "a", "input": ["sq: " + t for t in TEXTS]}).json()["usage"]
    assert res.meta.billed_units.input_tokens == usage["total_tokens"]
    cut = co.embed(model="a", texts=TEXTS[:3], input_type="search_document", embedding_types=["float", "int8"],
                   output_dimension=64)
    assert len(cut.embeddings.int8[0]) == 64
    np.testing.assert_allclose(np.array(cut.embeddings.float_),
                               st_vectors(st_embed, ["doc: " + t for t in TEXTS[:3]], 64), atol=2e-6)
    plain = co.embed(model="a", texts=["x"], input_type="search_document")  # no embedding_types: float
    assert len(plain.embeddings.float_[0]) == 384 and plain.embeddings.int8 is None


def test_cohere_v1_sdk_floats_without_types_and_by_type_with_them(served, st_embed):
    import cohere

    co = cohere.Client(api_key="unused", base_url=served.url)
    floats = co.embed(model="a", texts=TEXTS[:3], input_type="search_document")
    assert floats.response_type == "embeddings_floats"
    np.testing.assert_allclose(np.array(floats.embeddings), st_embed(["doc: " + t for t in TEXTS[:3]]), atol=2e-6)
    typed = co.embed(model="a", texts=TEXTS[:3], input_type="search_document", embedding_types=["int8", "float"])
    assert typed.response_type == "embeddings_by_type" and typed.meta.api_version.version == "1"
    assert len(typed.embeddings.int8[0]) == 384
    np.testing.assert_allclose(np.array(typed.embeddings.float_), floats.embeddings, atol=0)


def test_langchain_cohere_puts_documents_and_queries_on_their_prompts(served, st_embed):
    from langchain_cohere import CohereEmbeddings

    emb = CohereEmbeddings(model="a", cohere_api_key="unused", base_url=served.url)
    docs = emb.embed_documents(TEXTS[:3])
    np.testing.assert_allclose(np.array(docs), st_embed(["doc: " + t for t in TEXTS[:3]]), atol=2e-6)
    query = emb.embed_query("where is the cat")
    np.testing.assert_allclose(np.array(query), st_embed(["sq: where is the cat"])[0], atol=2e-6)


@pytest.mark.parametrize("model, input_type, prompt", [
    ("a", "search_query", "sq: "), ("a", "search_document", "doc: "), ("a", "clustering", "clu: "),
    ("a", "classification", ""),  # its prompt is empty: absent, and "a" has no default
    ("a", None, ""),
    ("b", "search_query", "q: "), ("b", "search_document", "p: "), ("b", "classification", "cls: "),
    ("b", "clustering", "o: "),  # no such prompt: the default
    ("b", None, "o: "),
])
def test_input_type_picks_the_prompt(served, st_embed, model, input_type, prompt):
    body = {"model": model, "texts": ["where is the cat"], "embedding_types": ["float"]}
    if input_type:
        body["input_type"] = input_type
    r = post(served, "/v2/embed", body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["embeddings"]["float"][0], st_embed([prompt + "where is the cat"])[0],
                               atol=2e-6)


def test_truncate_modes_against_transformers_on_the_ids_each_keeps(served, minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    # 1,500 words: far past 256 tokens, and past the characters read at once (16 per token: START reads a tail)
    text = long_text(1500, seed=11) + " and the very last words"
    assert len(text) > 16 * 256

    def reference(side: str) -> np.ndarray:
        tok.truncation_side = side
        ids = tok(text, truncation=True, max_length=256, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            v = model(input_ids=ids).last_hidden_state[0].mean(0)
        return (v / v.norm()).numpy()

    def embed(truncate):
        body = {"model": "a", "texts": [text], "embedding_types": ["float"]}
        if truncate != "absent":
            body["truncate"] = truncate
        return post(served, "/v2/embed", body)

    for mode, side in (("END", "right"), ("absent", "right"), (None, "right"), ("START", "left")):
        r = embed(mode)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embeddings"]["float"][0], reference(side), atol=2e-5)
        assert r.json()["meta"]["billed_units"]["input_tokens"] == 256
    r = embed("NONE")
    assert r.status_code == 400 and "256" in r.text

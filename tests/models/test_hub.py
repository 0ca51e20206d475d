"""Models named by Hub id: downloaded from a fake Hub on 127.0.0.1 into a cache, with the Hub's errors explained."""

from __future__ import annotations

import shutil
import socket

import pytest

from embedserve.errors import ModelLoadError
from embedserve.models.hub import is_hub_id, resolve
from fakehub import FakeHub
from tiny import build_tiny_encoder

SERVED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
          "special_tokens_map.json", "modules.json", "1_Pooling/config.json"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("rev-main"), tmp_path_factory.mktemp("rev-v1")
    build_tiny_encoder(a, "bert", seed=1)
    build_tiny_encoder(b, "bert", seed=2)
    return a, b


@pytest.fixture(scope="module")
def hub(folders):
    a, b = folders
    hub = FakeHub().start()
    files = {p.relative_to(a).as_posix(): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    extras = {"pytorch_model.bin": b"\x80pickle", "onnx/model.onnx": b"onnx", "README.md": b"# tiny"}
    hub.add("tiny/open", {**files, **extras})
    # bge-m3's layout: its two heads only as .pt (fetched, read weights_only), beside a .pt nothing reads
    heads = {"sparse_linear.pt": b"\x80heads", "colbert_linear.pt": b"\x80heads", "optimizer.pt": b"\x80pickle",
             "sub/sparse_linear.pt": b"\x80pickle"}
    hub.add("tiny/m3", {**files, **heads})
    hub.add("tiny/open", b, revision="v1")
    hub.add("tiny/gated", a, gated=True)
    hub.add("tiny/pickles", {"config.json": files["config.json"], "pytorch_model.bin": b"\x80pickle"})
    yield hub
    hub.stop()


@pytest.fixture
def fetch(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file from elsewhere

    def fetch(model, revision=None, *, token=None, offline=False, endpoint=None):
        return resolve(model, revision, endpoint=endpoint or hub.url, cache_dir=tmp_path / "cache", token=token,
                       offline=offline)

    return fetch


def files_in(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_only_what_serving_reads_is_fetched_and_the_revision_is_pinned(fetch, folders):
    a, b = folders
    main = fetch("tiny/open")
    assert files_in(main.directory) == SERVED  # no pickles, no ONNX, no README
    assert (main.directory / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    v1 = fetch("tiny/open", "v1")
    assert (v1.directory / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert v1.commit != main.commit and v1.directory != main.directory
    by_commit = fetch("tiny/open", v1.commit)
    assert by_commit.directory == v1.directory


def test_bge_m3s_pt_heads_are_the_only_pt_files_fetched(fetch):
    assert files_in(fetch("tiny/m3").directory) == SERVED | {"sparse_linear.pt", "colbert_linear.pt"}


def test_offline_starts_come_from_the_cache_without_a_request(fetch, hub, tmp_path):
    online = fetch("tiny/open", "v1")
    before = hub.count()
    offline = fetch("tiny/open", "v1", offline=True)
    assert offline.directory == online.directory and hub.count() == before
    with pytest.raises(ModelLoadError) as err:
        fetch("tiny/open", "main", offline=True)  # another revision, never downloaded
    msg = err.value.message
    assert "tiny/open (revision main) is not in the Hugging Face cache at" in msg and str(tmp_path / "cache") in msg
    assert "HF_HUB_OFFLINE" in msg and "embedserve download tiny/open" in msg
    assert hub.count() == before


def test_an_unreachable_hub_falls_back_to_the_cache(fetch, caplog):
    cached = fetch("tiny/open")
    caplog.set_level("WARNING")
    # A port this test holds bound but never listens on: connections to it are refused, and no other process
    # can take it meanwhile (a fixed port such as 9 may be served on some host).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{held.getsockname()[1]}"
        again = fetch("tiny/open", endpoint=nowhere)
        assert again.directory == cached.directory and "could not be reached" in caplog.text
        with pytest.raises(ModelLoadError, match=r"tiny/open \(revision v1\) is not in the Hugging Face cache.*could not be"):
            fetch("tiny/open", "v1", endpoint=nowhere)


@pytest.mark.parametrize("model, revision, token, message", [
    ("tiny/nope", None, None, r"tiny/nope \(revision main\) was not found on http://127.0.0.1:\d+: check the id. If it is "
                              r"private, set HF_TOKEN"),
    ("tiny/open", "nope", None, r"tiny/open \(revision nope\): the revision 'nope' does not exist"),
    ("tiny/gated", None, None, r"tiny/gated \(revision main\) is gated: accept its conditions on "
                               r"http://127.0.0.1:\d+/tiny/gated, then set HF_TOKEN"),
    ("tiny/gated", None, "hf_wrong", r"tiny/gated \(revision main\): the token in HF_TOKEN is not valid"),
    ("tiny/pickles", None, None, r"tiny/pickles \(revision main\) has only pickled weights \(pytorch_model.bin\), "
                                 r"which embedserve never loads"),
])
def test_hub_errors_name_the_id_the_revision_and_the_way_out(fetch, model, revision, token, message):
    with pytest.raises(ModelLoadError, match=message):
        fetch(model, revision, token=token)


def test_a_gated_repository_with_an_accepted_token(fetch, hub, folders):
    got = fetch("tiny/gated", token=hub.token)
    assert (got.directory / "model.safetensors").read_bytes() == (folders[0] / "model.safetensors").read_bytes()


def test_local_folders_and_hub_ids_are_told_apart(folders, tmp_path):
    a, _ = folders
    assert resolve(str(a)).directory == a and not is_hub_id(str(a))
    assert is_hub_id("BAAI/bge-base-en-v1.5") and is_hub_id("gpt2")
    for path in (str(tmp_path / "missing"), "./relative/missing", "../up"):
        assert not is_hub_id(path)
        with pytest.raises(ModelLoadError, match="does not exist"):
            resolve(path)
    with pytest.raises(ModelLoadError, match="--revision v1 applies to Hub ids"):
        resolve(str(a), "v1")
    shutil.rmtree(tmp_path, ignore_errors=True)

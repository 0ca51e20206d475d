"""Where a model's folder comes from: a local directory as it is, or a Hugging Face Hub repository id downloaded
into huggingface_hub's standard cache.

huggingface_hub reads its own variables, which embedserve honours by leaving them to it: ``HF_HOME`` /
``HF_HUB_CACHE`` (the cache), ``HF_TOKEN`` (gated and private repositories), ``HF_ENDPOINT`` (mirrors) and
``HF_HUB_OFFLINE`` (the cache only). Only what serving reads is fetched: configs, tokenizer files, safetensors
weights (single or sharded, with their index) and the sentence-transformers module folders. Pickled weights
are never downloaded: a repository that has only ``.bin``/``.pt`` weights is refused. Every error names the id
and the revision, and what to do about it.

While files download, the log says how many bytes of how many have arrived (every few seconds); on a terminal
huggingface_hub's own progress bars show as well.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from embedserve.errors import ModelLoadError

log = logging.getLogger(__name__)

# What serving reads. huggingface_hub matches these with fnmatch, where "*" also crosses "/": module folders
# (1_Pooling/config.json, 2_Dense/model.safetensors) match too.
# bge-m3 publishes its two small heads only as torch.save state dicts: those two are fetched and read with
# torch.load(weights_only=True) and a shape check (models/lexical.py); no other .pt file is.
PT_HEADS = ["sparse_linear.pt", "colbert_linear.pt"]
SERVING_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*", *PT_HEADS]
# Never: other runtimes' exports, and pickles (even where a safetensors copy sits beside them); a .pt file only
# reaches the allowed list by the exact names above.
NOT_SERVED = ["onnx/*", "openvino/*", "*.onnx", "*.bin", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.ot",
              "*.gguf"]
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROGRESS_EVERY_S = 2.0


def is_hub_id(model: str) -> bool:
    """A Hub repository id (``name`` or ``org/name``) rather than a local folder."""
    return not Path(model).expanduser().is_dir() and bool(_REPO_ID.match(model)) and ".." not in model


@dataclass(frozen=True)
class Source:
    """Where a model folder came from, for the start-up log."""

    directory: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None


def resolve(
    model: str,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    offline: bool | None = None,
) -> Source:
    """The local folder to load ``model`` from, downloading a Hub repository if need be.

    ``endpoint``, ``cache_dir``, ``token`` and ``offline`` default to huggingface_hub's own settings (its
    ``HF_*`` variables); tests pass them explicitly."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            raise ModelLoadError(f"--revision {revision} applies to Hub ids, and {model} is a local folder")
        return Source(path)
    if not is_hub_id(model):
        raise ModelLoadError(f"model directory {model} does not exist (and it is not a Hugging Face Hub id)")
    from huggingface_hub import constants

    hub = _Hub(
        model, revision, endpoint=endpoint or constants.ENDPOINT,
        cache_dir=Path(cache_dir or constants.HF_HUB_CACHE),
        token=token, offline=constants.HF_HUB_OFFLINE if offline is None else offline,
    )
    return hub.fetch()


class _Hub:
    def __init__(self, repo_id: str, revision: str | None, *, endpoint: str, cache_dir: Path, token: str | None,
                 offline: bool) -> None:
        self.repo_id, self.revision = repo_id, revision
        self.endpoint, self.cache_dir, self.token, self.offline = endpoint.rstrip("/"), cache_dir, token, offline
        self.where = f"{repo_id} (revision {revision or 'main'})"

    # -- the cache ---------------------------------------------------------------------------------------------
    def _cached(self, why: str):
        """The snapshot in the cache, or an error that says where the cache is and why it was not enough."""
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(
                self.repo_id, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True,
                allow_patterns=SERVING_FILES, ignore_patterns=NOT_SERVED,
            )
        except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, and their 1.x spellings
            raise ModelLoadError(
                f"{self.where} is not in the Hugging Face cache at {self.cache_dir} ({why}). Download it first with "
                f"`embedserve download {self.repo_id}{f' --revision {self.revision}' if self.revision else ''}` "
                f"where {self.endpoint} can be reached, or point HF_HOME / HF_HUB_CACHE at a cache that holds it."
            ) from e
        return Source(Path(folder), self.repo_id, self.revision, Path(folder).name)

    # -- the Hub -----------------------------------------------------------------------------------------------
    def fetch(self) -> Source:
        if self.offline:
            source = self._cached("HF_HUB_OFFLINE is set")
            log.info("model %s from the cache at %s (offline)", self.where, source.directory)
            return source
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(self.repo_id, revision=self.revision)
            tree = [f for f in api.list_repo_tree(self.repo_id, revision=info.sha, recursive=True)
                    if hasattr(f, "size")]
        except HfHubHTTPError as e:
            raise self._explain(e) from e
        except Exception as e:  # the Hub cannot be reached: a cached copy will do
            source = self._cached(f"{self.endpoint} could not be reached: {type(e).__name__}: {e}")
            log.warning("%s could not be reached (%s); serving %s from the cache at %s", self.endpoint,
                        type(e).__name__, self.where, source.directory)
            return source
        names = [f.path for f in tree]
        weights = [n for n in names if n.endswith(".safetensors")]
        if not weights:
            pickles = [n for n in names if n.endswith(PICKLES)]
            if pickles:
                raise ModelLoadError(
                    f"{self.where} has only pickled weights ({', '.join(pickles[:3])}), which embedserve never loads "
                    "(unpickling runs code from the file). Use a revision or a copy of the model with "
                    ".safetensors weights."
                )
            raise ModelLoadError(f"{self.where} has no .safetensors weights; its files: {', '.join(names[:12])}")
        wanted = _serving_files(tree)
        total = sum(f.size or 0 for f in wanted)
        log.info("downloading %s (commit %s): %d files, %.1f MB, from %s into %s", self.where, info.sha[:12],
                 len(wanted), total / 1e6, self.endpoint, self.cache_dir)
        started = time.perf_counter()
        with _Progress(self, total):
            try:
                folder = self._download(info.sha)
            except HfHubHTTPError as e:
                raise self._explain(e) from e
        log.info("downloaded %s in %.1fs: %s", self.where, time.perf_counter() - started, folder)
        return Source(Path(folder), self.repo_id, self.revision, info.sha)

    def _download(self, commit: str) -> str:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        # A bar on a terminal; in a log (a container's), the byte counts of _Progress only.
        quiet = not sys.stderr.isatty()
        was_disabled = are_progress_bars_disabled()
        if quiet:
            disable_progress_bars()
        try:
            # By the revision's name, so that the cache records the name -> commit reference for offline starts.
            return snapshot_download(
                self.repo_id, revision=self.revision, cache_dir=self.cache_dir, token=self.token,
                endpoint=self.endpoint, allow_patterns=SERVING_FILES, ignore_patterns=NOT_SERVED,
            )
        finally:
            if quiet and not was_disabled:
                enable_progress_bars()

    def _explain(self, e: Exception) -> ModelLoadError:
        from huggingface_hub import get_token
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        has_token = bool(self.token or get_token())
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        message = response.headers.get("X-Error-Message", "") if response is not None else ""
        page = f"{self.endpoint}/{self.repo_id}"
        if isinstance(e, RevisionNotFoundError):
            return ModelLoadError(f"{self.where}: the revision {self.revision!r} does not exist on {page} "
                                  "(a branch, a tag or a commit id).")
        if isinstance(e, GatedRepoError):
            if has_token:
                return ModelLoadError(f"{self.where} is gated and the token in HF_TOKEN has no access to it: accept "
                                      f"its conditions on {page} with that account, or use another token.")
            return ModelLoadError(f"{self.where} is gated: accept its conditions on {page}, then set HF_TOKEN to a "
                                  "token of that account.")
        if status == 401 and "credentials" in message.lower():
            return ModelLoadError(f"{self.where}: the token in HF_TOKEN is not valid for {self.endpoint} "
                                  f"({message}). Set a valid token, or unset HF_TOKEN for public models.")
        if isinstance(e, RepositoryNotFoundError) or status in (401, 404):
            hint = "" if has_token else " If it is private, set HF_TOKEN."
            return ModelLoadError(f"{self.where} was not found on {self.endpoint}: check the id.{hint}")
        return ModelLoadError(f"{self.where}: the Hub at {self.endpoint} answered {status}: {e}")


def _serving_files(tree) -> list:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(tree, allow_patterns=SERVING_FILES, ignore_patterns=NOT_SERVED,
                                    key=lambda f: f.path))


class _Progress:
    """Logs the bytes that have arrived in the repository's cache folder while a download runs."""

    def __init__(self, hub: _Hub, total: int) -> None:
        from huggingface_hub.file_download import repo_folder_name

        self.blobs = hub.cache_dir / repo_folder_name(repo_id=hub.repo_id, repo_type="model") / "blobs"
        self.where, self.total = hub.where, total
        self.before = self._size()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedserve-download-progress", daemon=True)

    def _size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.blobs.iterdir() if p.is_file())
        except OSError:
            return 0

    def _report(self) -> None:
        done = max(0, self._size() - self.before)
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        log.info("downloading %s: %.1f of %.1f MB%s", self.where, done / 1e6, self.total / 1e6, pct)

    def _run(self) -> None:
        while not self._stop.wait(_PROGRESS_EVERY_S):
            self._report()

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._report()  # the last word: all of it

"""Token-id inputs in OpenAI's cl100k_base vocabulary, turned back into the text they encode.

OpenAI clients (LangChain's ``OpenAIEmbeddings`` by default) tokenize with tiktoken's cl100k_base and send
``list[list[int]]``. Read as ids of the served model's own vocabulary those would embed garbage, so by
default embedserve decodes them: cl100k is a byte-level BPE, so the bytes of the ids joined together are
exactly the bytes of the text the client tokenized.

The table ships inside the package (``embedserve/data/cl100k_base.tiktoken.gz``: OpenAI's published
``cl100k_base.tiktoken``, gzipped, checked against its published SHA-256 on load), so an offline container
decodes exactly as a laptop online does. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from importlib import resources

from embedserve.errors import InvalidRequest, ModelLoadError

_TABLE = "cl100k_base.tiktoken.gz"
_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
# cl100k_base's special tokens sit after the 100,256 ranked byte sequences.
_SPECIAL = {
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    100276: "<|endofprompt|>",
}


class Cl100kDecoder:
    def __init__(self) -> None:
        raw = gzip.decompress(resources.files("embedserve.data").joinpath(_TABLE).read_bytes())
        if hashlib.sha256(raw).hexdigest() != _SHA256:
            raise ModelLoadError(f"embedserve/data/{_TABLE} is corrupt (SHA-256 mismatch); reinstall embedserve")
        pieces: list[bytes] = []
        for rank, line in enumerate(raw.splitlines()):
            token, number = line.split()
            if int(number) != rank:
                raise ModelLoadError(f"embedserve/data/{_TABLE}: rank {number} out of order at line {rank + 1}")
            pieces.append(base64.b64decode(token))
        for i, text in _SPECIAL.items():
            while len(pieces) < i:
                pieces.append(b"")  # unused ids between the ranks and the specials: refused below
            pieces.append(text.encode())
        self._pieces = pieces
        self._valid_top = len(pieces)
        self._unused = frozenset(range(100256, 100276)) - frozenset(_SPECIAL)
        self.size = len(pieces)

    def decode(self, ids: list[int], *, index: int) -> str:
        bad = next((t for t in ids if not 0 <= t < self._valid_top or t in self._unused), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{index}] contains token id {bad}, which is not in OpenAI's cl100k_base vocabulary "
                f"(0..{self._valid_top - 1}) that this server reads token ids in. If you send ids of the served "
                "model's own tokenizer, start the server with --token-ids model (EMBEDSERVE_TOKEN_IDS=model).",
                param="input",
            )
        pieces = self._pieces
        # A chunk boundary may cut a multi-byte character; tiktoken decodes the same way.
        return b"".join([pieces[t] for t in ids]).decode("utf-8", errors="replace")


_decoder: Cl100kDecoder | None = None
_lock = threading.Lock()


def cl100k() -> Cl100kDecoder:
    """The shared decoder, built on first use (about 0.2 s)."""
    global _decoder
    with _lock:
        if _decoder is None:
            _decoder = Cl100kDecoder()
        return _decoder

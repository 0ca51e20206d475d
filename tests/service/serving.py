"""Real `embedserve serve` processes on 127.0.0.1 (tests and benchmarks both start them this way)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from on_device import DEVICE

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def tiktoken_cache() -> Path:
    """A TIKTOKEN_CACHE_DIR holding cl100k_base, so the OpenAI-side clients (LangChain's tiktoken) never go
    online: tiktoken looks for the file under the SHA-1 of its URL (and checks its SHA-256 itself); the bytes
    are the table embedserve ships in its package data."""
    cache = Path(tempfile.gettempdir()) / f"embedserve-tests-tiktoken-{os.getuid()}"
    target = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not target.is_file():
        cache.mkdir(exist_ok=True)
        table = importlib.resources.files("embedserve") / "data" / "cl100k_base.tiktoken.gz"
        partial = cache / f"{target.name}.{os.getpid()}"
        partial.write_bytes(gzip.decompress(table.read_bytes()))
        partial.replace(target)  # atomic: parallel sessions never read half a file
    return cache


os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))

# uvicorn's line once it has bound its socket: the server is started on port 0 and the port is read back from it.
_BOUND = re.compile(r"Uvicorn running on (http://[0-9.]+:[0-9]+)")


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log
        self._url: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` as the server bound it (port 0: the kernel's choice, so no other process can
        take it between choosing and binding), read from its log; waits for it, 120 s at most."""
        deadline = time.monotonic() + 120
        while self._url is None:
            found = _BOUND.search(self.output())
            if found:
                self._url = found.group(1)
            elif self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.output()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"server not listening in 120 s:\n{self.output()}")
            else:
                time.sleep(0.05)
        return self._url


@contextlib.contextmanager
def run_server(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, wait_ready: bool = True,
               address_space: int | None = None, cwd: Path | None = None):
    """``address_space``: the server's RLIMIT_AS in bytes (``ulimit -v``), for memory-limit tests; ``cwd``: the
    working directory ``python -m embedserve`` starts in (default: the test's own)."""
    fd, name = tempfile.mkstemp(prefix="server-", suffix=".log", dir=tmp_path)
    os.close(fd)
    log = Path(name)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSERVE_")}
    full_env["EMBEDSERVE_DEVICE"] = str(DEVICE)  # the test device, not whatever "auto" finds
    if DEVICE.type == "cpu":
        # The tests compare with sentence-transformers at fp32 tolerances; on a CPU with native bf16, auto would
        # pick bf16. A test that wants auto passes EMBEDSERVE_DTYPE=auto (or --dtype).
        full_env["EMBEDSERVE_DTYPE"] = "float32"
    # Nothing may reach a hub at run time unless a test says so (the fake Hub's tests): prove it works offline.
    full_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    full_env.update(env or {})
    full_env.pop("TIKTOKEN_CACHE_DIR", None)  # the server must find cl100k by itself
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedserve", "serve", "--port", "0", *flags],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            preexec_fn=None if address_space is None else lambda: resource.setrlimit(
                resource.RLIMIT_AS, (address_space, resource.RLIM_INFINITY)),
        )
    server = Server(proc, log)
    try:
        if wait_ready:
            deadline = time.monotonic() + 120
            server.url  # noqa: B018 - waits until it listens
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
                try:
                    if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready in 120 s:\n{server.output()}")
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def cross_encoder_server(folder: Path, kind: str, served_name: str, **build):
    """A tiny random cross-encoder of ``kind`` built into ``folder`` (tiny.build_tiny_cross_encoder's keywords)
    and served alone under ``served_name``: yields (server, the sentence-transformers CrossEncoder)."""
    from tiny import build_tiny_cross_encoder

    ce = build_tiny_cross_encoder(folder, kind, **build)
    with run_server(folder.parent, "--model", str(folder), "--served-model-name", served_name) as server:
        yield server, ce

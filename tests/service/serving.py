"""Real `embedserve serve` processes on 127.0.0.1 (tests and benchmarks both start them this way)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from on_device import DEVICE

import llama_index.core

# tiktoken downloads cl100k_base on first use; llama-index-core ships the file (contract, offline note).
TIKTOKEN_CACHE = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, wait_ready: bool = True,
               address_space: int | None = None, cwd: Path | None = None):
    """``address_space``: the server's RLIMIT_AS in bytes (``ulimit -v``), for memory-limit tests; ``cwd``: the
    working directory ``python -m embedserve`` starts in (default: the test's own)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
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
            [sys.executable, "-m", "embedserve", "serve", "--port", str(port), *flags],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            preexec_fn=None if address_space is None else lambda: resource.setrlimit(
                resource.RLIMIT_AS, (address_space, resource.RLIM_INFINITY)),
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        if wait_ready:
            deadline = time.monotonic() + 120
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

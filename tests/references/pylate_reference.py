"""PyLate's side of the ColBERT tests, run by the tests in PyLate's own virtual environment (its pins differ from
the project's): ``python pylate_reference.py JOB.json``.

The job names a base encoder folder (saved by transformers, no sentence-transformers modules), the ColBERT settings,
the folder to save the model to, and the texts. This script builds ``pylate.models.ColBERT`` on the base (a random
Dense projection, the prefix tokens added to the tokenizer), saves it, and writes beside the job, in safetensors (no
pickles): each query's and document's vectors from ``ColBERT.encode(..., is_query=True|False)``; and in JSON:
``rank.rerank``'s order and scores for the rerank sets. Only the standard library, torch, safetensors and PyLate.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    job_path = Path(sys.argv[1])
    job = json.loads(job_path.read_text())
    from pylate import models, rank

    torch.manual_seed(job.get("seed", 0))
    model = models.ColBERT(model_name_or_path=job["base"], device="cpu", **job["colbert"])
    model.save(job["out"])
    model = models.ColBERT(model_name_or_path=job["out"], device="cpu")  # as a user loads the saved folder
    tensors = {}
    for side, texts in (("query", job["queries"]), ("document", job["documents"])):
        vectors = model.encode(texts, is_query=side == "query", batch_size=3, convert_to_numpy=False)
        for i, v in enumerate(vectors):
            tensors[f"{side}.{i}"] = v.detach().float().contiguous()
    save_file(tensors, str(job_path.with_suffix(".safetensors")))
    ranked = []
    for query, docs in job.get("rerank", []):
        q = model.encode([query], is_query=True, convert_to_numpy=False)
        d = model.encode(docs, is_query=False, convert_to_numpy=False)
        ranked.append([[r["id"], float(r["score"])] for r in rank.rerank(documents_ids=[list(range(len(docs)))],
                                                                       queries_embeddings=q,
                                                                       documents_embeddings=[d])[0]])
    job_path.with_suffix(".rerank.json").write_text(json.dumps(ranked))


if __name__ == "__main__":
    main()

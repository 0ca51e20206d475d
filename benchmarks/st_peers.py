"""The CPU runtimes sentence-transformers offers, timed for bench_engine in their own venv (.venv/bench, built from
benchmarks/peers.txt: sentence-transformers[onnx,openvino] pins other releases than ours):
``python st_peers.py MODEL_DIR TEXTS.json REPEATS``.

Copies the model folder, then times ``encode(texts, batch_size=32)`` on each backend, after a warm-up call:

- ``torch fp32``: sentence-transformers itself (the reference of the min cosine);
- ``onnx fp32``: ONNX Runtime, the model exported by sentence-transformers;
- ``onnx int8``: ``export_dynamic_quantized_onnx_model`` (avx512_vnni when the CPU has VNNI, else avx2);
- ``openvino``: OpenVINO at its default precision (bf16 on a CPU that computes it natively);
- ``openvino int8``: OpenVINO's static post-training quantization (``optimum.intel.OVQuantizer``, default
  ``OVQuantizationConfig``) calibrated offline on the first 300 of the texts, as
  ``export_static_quantized_openvino_model`` does with a Hub dataset; padded to 384 tokens, its recipe.
- ``torch pt2e int8``: PyTorch's own static int8 path (PT2E, in torchao since torch 2.10): the transformers model
  through ``torch.export``, ``X86InductorQuantizer``'s default static config, calibrated on the same 300 texts,
  then ``torch.compile`` (inductor, freezing; a C++ compiler). Batches as ``encode`` makes them (longest texts
  first, padded per batch), mean pooling and normalizing as the model's own modules do.

Prints one JSON line: per backend its median seconds and its min cosine against torch fp32; and the tokens the
texts hold (the tokenizer's, cut to the model's max_seq_length), which embedserve counts the same way.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402  (the standard library only, at import)

CALIBRATION_TEXTS = 300
# The bench venv's python (the caller's side: bench_engine and bench_http run this file with it).
PEERS = Path(os.environ.get("EMBEDSERVE_BENCH_PYTHON", Path(__file__).resolve().parents[1] / ".venv" / "bench" / "bin"
                            / "python"))
# embedserve's row -> the peers at the same precision (OpenVINO's default is bf16 on a CPU that computes it)
SAME_PRECISION = {"fp32": ("onnx fp32",), "bf16": ("openvino",),
                  "int8": ("onnx int8", "openvino int8", "torch pt2e int8")}


def run_peers(model_dir: str, texts: list[str], repeats: int) -> dict | None:
    """For the callers in our own venv: this file run in the bench venv on ``texts``; its JSON (``tokens``,
    ``threads``, ``runs``: backend -> seconds, min_cos, mean_cos), or None after saying why there is none."""
    if not PEERS.is_file():
        print(f"peers: {PEERS} is missing (see bench_engine's docstring): no ONNX Runtime / OpenVINO rows")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp) / "texts.json"
        listed.write_text(json.dumps(texts))
        run = subprocess.run([str(PEERS), __file__, model_dir, str(listed), str(repeats)], capture_output=True,
                             text=True)
    if run.returncode:
        print(f"peers failed: {run.stderr[-2000:]}")
        return None
    return json.loads(run.stdout.strip().splitlines()[-1])


def print_runs(found: dict, tokens: int, st_seconds: float | None = None) -> None:
    """One line per peer of :func:`run_peers`'s answer: tokens/s (at ``tokens`` for the texts), the ratio to
    sentence-transformers timed by the caller (``st_seconds``) where given, and the min cosine."""
    for name, r in found["runs"].items():
        ratio = "" if st_seconds is None else f"  ratio {st_seconds / r['seconds']:.2f}x"
        print(f"  {name:28s} {tokens / r['seconds']:10.0f} tok/s  ({r['seconds']:.3f} s){ratio}  min cosine vs ST "
              f"fp32 {r['min_cos']:.6f} (mean {r['mean_cos']:.6f})")


def fastest(found: dict, precision: str) -> str:
    """The fastest peer at embedserve's ``precision`` (a key of :data:`SAME_PRECISION`)."""
    return min(SAME_PRECISION[precision], key=lambda peer: found["runs"][peer]["seconds"])


def vnni() -> bool:
    try:
        return " avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class Pt2eInt8:
    """``torch pt2e int8``: the sentence-transformers model's transformers module exported, statically quantized
    by PT2E for x86 inductor on ``calibration``, compiled; ``encode`` as sentence-transformers batches, pools (mean)
    and normalizes. (For MiniLM-shaped models: mean pooling, then a Normalize module.)"""

    def __init__(self, st, calibration: list[str]) -> None:
        import torch._inductor.config as inductor
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torch.export import Dim, export
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        self.tokenizer, self.limit = st.tokenizer, st.max_seq_length
        hf = st[0].auto_model.eval()

        class Hidden(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = hf

            def forward(self, ids, mask):
                return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

        example = self._batches(calibration[:8], 8)[0][1]
        batch, length = Dim("batch", min=1, max=64), Dim("length", min=2, max=self.limit)
        graph = export(Hidden(), (example["input_ids"], example["attention_mask"]),
                       dynamic_shapes={"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}).module()
        # torchao 0.18's linear + GELU annotation fails on torch 2.13's exported graphs (IndexError while it
        # partitions them); without it each linear is still quantized, the GELU runs in float.
        xiq.X86InductorQuantizer._annotate_linear_unary = lambda *args, **kwargs: None
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for _, b in self._batches(calibration, 8):
                prepared(b["input_ids"], b["attention_mask"])
        inductor.freezing = True
        self.model = torch.compile(convert_pt2e(prepared), dynamic=True)

    def _batches(self, texts: list[str], size: int) -> list[tuple[list[int], dict]]:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first, as encode sorts
        return [(order[i : i + size], self.tokenizer([texts[j] for j in order[i : i + size]], padding=True,
                                                     truncation=True, max_length=self.limit, return_tensors="pt"))
                for i in range(0, len(texts), size)]

    def encode(self, texts: list[str], batch_size: int = 32, show_progress_bar: bool = False,
               convert_to_tensor: bool = False) -> torch.Tensor:
        parts = []
        with torch.no_grad():
            for where, b in self._batches(texts, batch_size):
                hidden = self.model(b["input_ids"], b["attention_mask"]).float()
                mask = b["attention_mask"].unsqueeze(-1).float()
                parts.append((where, torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)))
        out = torch.empty(len(texts), parts[0][1].shape[1])
        for where, vectors in parts:
            out[where] = vectors
        return out


def main() -> None:
    source, texts_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    texts = json.loads(Path(texts_path).read_text())
    from datasets import Dataset
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(source, folder)
        models = {"torch fp32": SentenceTransformer(str(folder), device="cpu")}
        onnx = SentenceTransformer(str(folder), device="cpu", backend="onnx")
        onnx.save(str(folder))  # the export, where the quantizer reads it
        flavour = "avx512_vnni" if vnni() else "avx2"
        export_dynamic_quantized_onnx_model(onnx, flavour, str(folder))
        models["onnx fp32"] = onnx
        models["onnx int8"] = SentenceTransformer(str(folder), device="cpu", backend="onnx",
                                                  model_kwargs={"file_name": f"onnx/model_qint8_{flavour}.onnx"})
        ov = SentenceTransformer(str(folder), device="cpu", backend="openvino")
        models["openvino"] = ov
        calibration = Dataset.from_dict({"sentence": texts[:CALIBRATION_TEXTS]}).map(
            lambda batch: ov.tokenizer(batch["sentence"], padding="max_length", max_length=384, truncation=True),
            batched=True, remove_columns=["sentence"])
        quantized = Path(tmp) / "ov-int8"
        # the quantizer rewrites the model it is given: a copy, so that the "openvino" row stays unquantized
        to_quantize = SentenceTransformer(str(folder), device="cpu", backend="openvino")
        OVQuantizer.from_pretrained(to_quantize.transformers_model).quantize(
            calibration, save_directory=str(quantized),
            ov_config=OVConfig(quantization_config=OVQuantizationConfig(num_samples=CALIBRATION_TEXTS)))
        (folder / "openvino").mkdir(exist_ok=True)
        for suffix in (".xml", ".bin"):
            shutil.copy(quantized / "openvino" / f"openvino_model{suffix}",
                        folder / "openvino" / f"openvino_model_qint8{suffix}")
        models["openvino int8"] = SentenceTransformer(
            str(folder), device="cpu", backend="openvino", model_kwargs={"file_name": "openvino/openvino_model_qint8.xml"})
        models["torch pt2e int8"] = Pt2eInt8(SentenceTransformer(str(folder), device="cpu"), texts[:CALIBRATION_TEXTS])

        reference = models["torch fp32"].encode(texts, batch_size=32, convert_to_tensor=True)
        out = {}
        for name, model in models.items():
            seconds = median_ms(lambda: model.encode(texts, batch_size=32, show_progress_bar=False), repeats) / 1000
            vectors = torch.as_tensor(model.encode(texts, batch_size=32, convert_to_tensor=True)).float()
            cos = torch.nn.functional.cosine_similarity(vectors, reference.float())
            out[name] = {"seconds": seconds, "min_cos": cos.min().item(), "mean_cos": cos.mean().item()}
        tok = models["torch fp32"].tokenizer
        limit = models["torch fp32"].max_seq_length
        tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=limit)["input_ids"])
    print(json.dumps({"tokens": tokens, "threads": torch.get_num_threads(), "runs": out}))


if __name__ == "__main__":
    main()

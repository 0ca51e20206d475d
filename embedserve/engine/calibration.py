"""Text that calibration runs on.

:data:`CALIBRATION_TEXTS`: what int8 weight quantization (``--quantize int8``) calibrates on: what each linear
layer's input channels reach on ordinary input.

Written for this purpose, varied on purpose: queries and passages, instructions, code, numbers and tables,
several languages and scripts, short and long. Only the per-channel magnitudes are kept, so the exact words
matter little; that there is real text (and not one word repeated) matters a lot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Awaitable, Callable

import torch

from embedserve.errors import ConfigError
from embedserve.kernels.quantize import ranges_of

log = logging.getLogger(__name__)

BUILT_IN = "the built-in set (embedserve/data/calibration.txt)"

CALIBRATION_TEXTS: tuple[str, ...] = (
    "how do I reset my password",
    "best hiking trails near the coast in autumn",
    "What is the capital of Australia?",
    "query: symptoms of vitamin D deficiency in adults",
    "passage: The mitochondrion is the organelle that produces most of the chemical energy a cell needs, "
    "stored as adenosine triphosphate and released as the cell does its work.",
    "Represent this sentence for searching relevant passages: cheap flights to Lisbon in March",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: tides",
    "The committee postponed its decision until the auditors had finished reviewing last year's accounts, "
    "which had been delayed by a change of software in the finance department over the summer.",
    "Photosynthesis converts light energy into chemical energy; plants, algae and some bacteria do it, taking "
    "in carbon dioxide and water and giving off oxygen. The reactions happen in the chloroplasts.",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n",
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2024-01-01' GROUP BY 1;",
    '{"id": 4821, "status": "shipped", "items": [{"sku": "A-113", "qty": 2}], "total": 59.90}',
    "Quarterly revenue rose 12.4% to $3.18 billion, while operating margin fell from 21% to 18.6%.",
    "| year | population | growth |\n| 1990 | 5,123,004 | 1.2% |\n| 2020 | 6,870,551 | 0.8% |",
    "Error: connection refused (errno 111) while contacting 10.0.0.12:5432 after 3 retries",
    "Der Zug nach München fährt heute wegen Bauarbeiten zwanzig Minuten später ab.",
    "Le musée est fermé le lundi, mais les jardins restent ouverts toute la semaine.",
    "El informe meteorológico anuncia lluvias intensas en el norte durante el fin de semana.",
    "Модель обучена на большом корпусе текстов и хорошо находит похожие документы.",
    "東京の天気は明日晴れる予報です。週末は雨が降るかもしれません。",
    "我们需要在下周之前完成这个项目的测试和部署。",
    "لقد وصلت الرسالة متأخرة بسبب العطلة الرسمية",
    "OMG this update broke everything again 😡 can't even log in lol",
    "Thanks so much for the quick reply! 🙂 See you on Tuesday.",
    "Patient presents with acute onset of chest pain radiating to the left arm; ECG shows ST elevation.",
    "The defendant's motion to dismiss is denied, as the complaint states a plausible claim for relief.",
    "To replace the filter, switch off the unit, open the front panel, slide the old filter out and insert the "
    "new one with the arrow pointing towards the fan.",
    "In 1969 Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface while Michael "
    "Collins orbited above. " * 3,
    "a",
    "Yes.",
    "machine learning, neural networks, gradient descent, backpropagation, embeddings, transformers",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who had never "
    "once been late. Every morning he opened his shop at seven, wound every clock on the walls, and listened "
    "until they all agreed. One winter morning, one of them would not.",
)


@dataclass(frozen=True)
class OutputCalibration:
    """The texts the int8 / uint8 output types' per-dimension ranges are measured on, and where they came from."""

    texts: tuple[str, ...]
    source: str  # for the log

    @classmethod
    def load(cls, path: str | None) -> OutputCalibration:
        """``path``: one text per line (blank lines skipped; ``--int8-calibration``); None: :data:`BUILT_IN`, at
        least 1,000 varied texts shipped with the package (written by scripts/make_calibration_texts.py)."""
        if path is None:
            body = resources.files("embedserve.data").joinpath("calibration.txt").read_text(encoding="utf-8")
            source = BUILT_IN
        else:
            try:
                body = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"int8_calibration: cannot read {path}: {e}") from None
            source = path
        texts = tuple(line.strip() for line in body.splitlines() if line.strip())
        if not texts:
            raise ConfigError(f"int8_calibration: {path} holds no text (one text per line)")
        return cls(texts, f"{source}: {len(texts)} texts")


class OutputRanges:
    """int8 / uint8's per-dimension ranges for one model: the minimum and maximum over the calibration texts'
    vectors, embedded once (on the first request that needs them, through ``embed``: texts -> their full-width
    vectors before normalisation, as a request without ``prompt_name`` would embed them), and each (width,
    normalised) pair cut from those once and cached. Event-loop thread only."""

    def __init__(self, calibration: OutputCalibration, name: str,
                 embed: Callable[[tuple[str, ...]], Awaitable[tuple[torch.Tensor, int]]]) -> None:
        self.calibration, self.name, self._embed = calibration, name, embed
        self._vectors: asyncio.Future | None = None  # [n, D]: the calibration texts' raw vectors
        self._ranges: dict[tuple[int, bool], torch.Tensor] = {}

    async def get(self, dims: int, normalize: bool) -> torch.Tensor:
        """``[2, dims]``: each dimension's low and high end for vectors cut to ``dims``, normalised or not."""
        key = (dims, normalize)
        if key not in self._ranges:
            pending = self._vectors
            if pending is None or (pending.done() and (pending.cancelled() or pending.exception() is not None)):
                self._vectors = asyncio.ensure_future(self._measure())  # a failed one is tried again
            raw = await asyncio.shield(self._vectors)  # a client that goes away leaves it running for the next
            v = raw[:, :dims]
            if normalize:
                v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
            self._ranges[key] = ranges_of(v)
        return self._ranges[key]

    async def _measure(self) -> torch.Tensor:
        started = time.perf_counter()
        vectors, tokens = await self._embed(self.calibration.texts)
        log.info("%s: int8 / uint8 output ranges measured on %s (%d tokens) in %.1f s", self.name,
                 self.calibration.source, tokens, time.perf_counter() - started)
        return vectors

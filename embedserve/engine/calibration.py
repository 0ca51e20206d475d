"""Text that calibration runs on.

:data:`CALIBRATION_TEXTS`: what int8 weight quantization (``--quantize int8``) calibrates on: what each linear
layer's input channels reach on ordinary input.

Written for this purpose, varied on purpose: queries and passages, instructions, code, numbers and tables,
several languages and scripts, short and long. Only the per-channel magnitudes are kept, so the exact words
matter little; that there is real text (and not one word repeated) matters a lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from embedserve.errors import ConfigError

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

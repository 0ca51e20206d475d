"""Late chunking's layout: one document made of a request's chunks, the inputs the engine runs for it, and the
token spans each chunk's vector pools. Pure Python: no torch, no engine state.

The document is the model's start tokens, the prompt's tokens, every chunk's tokens (each chunk tokenized alone,
without special tokens) and the model's end tokens. In these *document positions* chunk ``i`` owns its own
tokens; the first chunk also owns the start tokens and the prompt, the last the end tokens.

A document that fits the model runs as one input. A longer one (bidirectional models only) runs as windows of
``W = max_length - start - end`` document tokens, window ``k`` starting at ``k * (W - overlap)``, each run as start
+ its tokens + end. Every document position takes its state from exactly one window: the first window that holds
it, except that a window after the first gives states only from its ``overlap``-th token on (the tokens before
that also sat, with more left context, in the window before); the start tokens' states come from the first window,
the end tokens' from the last.

:func:`plan` returns, per input to run, its ids and its spans ``(lo, hi, chunk)`` in that input's own positions:
the engine sums the final hidden states over each span into its chunk, and a chunk's vector is that sum over the
count of its positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedserve.errors import InvalidRequest


@dataclass(frozen=True)
class Plan:
    inputs: list[list[int]]  # the ids each run takes
    spans: list[list[tuple[int, int, int]]]  # per input: (lo, hi, chunk), in that input's positions
    chunk_tokens: list[int]  # document positions each chunk owns (their sum: the document's length)


def plan(chunks: list[list[int]], *, prompt: list[int], start: list[int], end: list[int], max_length: int,
         overlap: int, windows: bool) -> Plan:
    """The runs and spans for one document. ``windows``: whether a document longer than ``max_length`` may run as
    overlapping windows (bidirectional models); otherwise it must fit (a causal model runs it in one pass, as
    chunks over its key cache if long)."""
    for i, c in enumerate(chunks):
        if not c and 0 < i < len(chunks) - 1:
            raise InvalidRequest(f"input[{i}] has no tokens: late chunking pools each chunk's own tokens",
                                 param="input")
    s, e = len(start), len(end)
    doc = list(prompt)
    bounds = []  # each chunk's document positions [lo, hi)
    for c in chunks:
        bounds.append([s + len(doc), s + len(doc) + len(c)])
        doc.extend(c)
    total = s + len(doc) + e
    bounds[0][0] = 0
    bounds[-1][1] = total
    owned = [hi - lo for lo, hi in bounds]
    width = max_length - s - e
    if windows and not 0 <= overlap < width:
        raise InvalidRequest(f"late_chunking_overlap must be at least 0 and below the window of {width} document "
                             f"tokens, got {overlap}", param="late_chunking_overlap")
    if total <= max_length:
        spans = [(lo, hi, i) for i, (lo, hi) in enumerate(bounds) if hi > lo]
        return Plan([start + doc + end], [spans], owned)
    if not windows:
        raise InvalidRequest(
            f"the late-chunked document holds {total} tokens; this causal model runs a document in one pass, of at "
            f"most {max_length} tokens", param="input", code="context_length_exceeded")
    inputs, spans = [], []
    first = 0
    while True:
        last = first + width >= len(doc)
        stop = min(first + width, len(doc))
        inputs.append(start + doc[first:stop] + end)
        # The document positions this window gives states for, and where they sit in the window.
        gives = [(s + first + (overlap if first else 0), s + stop, -first)]  # (lo, hi, document -> window)
        if not first:
            gives.insert(0, (0, s, 0))
        if last:
            gives.append((s + len(doc), total, stop - first - len(doc)))
        mine = []
        for lo, hi, shift in gives:
            for i, (c_lo, c_hi) in enumerate(bounds):
                a, b = max(lo, c_lo), min(hi, c_hi)
                if a < b:
                    mine.append((a + shift, b + shift, i))
        spans.append(mine)
        if last:
            return Plan(inputs, spans, owned)
        first += width - overlap

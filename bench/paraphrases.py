"""Calibrate the semantic reply cache's threshold on the labelled pairs; print the result as JSON.

Each pair of ``tests/data/paraphrases.jsonl`` is a stored message and an incoming one, labelled
``same`` when the stored reply answers the incoming message too (a paraphrase) and not when it
would be wrong (a near miss: a negation, an opposite, another number, product, person, date or
topic). A pair "hits" when its cosine similarity reaches the threshold and ``same_slots`` agrees.

The threshold: the lowest at which no near miss hits, rounded up to the next 0.01 and raised by
``MARGIN``, because the pairs are a sample and a wrong reply costs more than a model call. The
report also splits the pairs in two halves, calibrates on one and counts wrong hits on the other,
to show how far a threshold chosen on some pairs carries to pairs it has not seen.

Run: ``.venv/bin/python bench/paraphrases.py`` (needs the ``cache`` extra; about 10 s).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rtagent.cache._embedding import MODEL_ID, shared_embedder
from rtagent.cache._replies import SEMANTIC_THRESHOLD, same_slots

PAIRS = Path(__file__).parent.parent / "tests" / "data" / "paraphrases.jsonl"
MARGIN = 0.01


Rows = list[tuple[float, bool, dict[str, Any]]]
"""Each pair with its similarity and whether its slots agree."""


def scored(pairs: list[dict[str, Any]]) -> Rows:
    """Each pair with its similarity and whether its slots agree."""
    embedder = shared_embedder()
    return [
        (
            float(embedder.embed(pair["stored"]) @ embedder.embed(pair["incoming"])),
            same_slots(pair["stored"], pair["incoming"]),
            pair,
        )
        for pair in pairs
    ]


def lowest_safe(rows: Rows, *, slots: bool) -> float:
    """The lowest threshold (to 0.001) at which no near miss hits."""
    top = max((s for s, agree, pair in rows if not pair["same"] and (agree or not slots)), default=0.0)
    return math.floor(top * 1000 + 1) / 1000


def outcome(rows: Rows, threshold: float, *, slots: bool = True) -> dict[str, Any]:
    hits = [(s, pair) for s, agree, pair in rows if s >= threshold and (agree or not slots)]
    wrong = [pair for _, pair in hits if not pair["same"]]
    paraphrases = sum(pair["same"] for _, _, pair in rows)
    right = len(hits) - len(wrong)
    return {
        "threshold": round(threshold, 3),
        "wrong_hits": len(wrong),
        "hits": right,
        "hit_rate": round(right / paraphrases, 3) if paraphrases else None,
        "wrong": [f"{pair['stored']} / {pair['incoming']} ({pair['kind']})" for pair in wrong],
    }


def chosen(rows: Rows) -> float:
    return math.ceil(lowest_safe(rows, slots=True) * 100) / 100 + MARGIN


def main() -> None:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    shared_embedder().warm()  # the load (half a second) is no message's time
    started = time.perf_counter()
    rows = scored(pairs)
    took = time.perf_counter() - started
    halves = rows[0::2], rows[1::2]
    held_out = [outcome(test, chosen(train)) for train, test in (halves, halves[::-1])]
    misses = [(s, pair) for s, agree, pair in rows if not pair["same"] and agree]
    nearest = sorted(misses, key=lambda row: -row[0])[:5]
    report = {
        "model": MODEL_ID,
        "pairs": len(pairs),
        "kinds": dict(Counter(pair["kind"] for pair in pairs)),
        "embedding_ms_per_message": round(took / (2 * len(pairs)) * 1000, 2),
        "similarity_alone": outcome(rows, lowest_safe(rows, slots=False), slots=False),
        "with_slots": outcome(rows, lowest_safe(rows, slots=True)),
        "closest_near_misses": [f"{s:.3f} {p['stored']} / {p['incoming']} ({p['kind']})" for s, p in nearest],
        "margin": MARGIN,
        "chosen": round(chosen(rows), 3),
        "shipped": outcome(rows, SEMANTIC_THRESHOLD),
        "held_out_halves": held_out,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

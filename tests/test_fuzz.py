"""A small slice of the fuzzer (``bench/fuzz.py`` sends 10,000 requests): a few hundred
hypothesis-generated requests over every endpoint and WebSocket command of a real ``rtagent
serve``, none of which may make it fail (a 5xx, a traceback in its log, a thread that cannot be
read back, a WebSocket dropped without a close frame, a hostile request let through...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import fuzz


def test_generated_requests_never_make_the_server_fail() -> None:
    # A fixed seed, whose requests reach every endpoint: the same requests each run, so a failure
    # here replays with `bench/fuzz.py --requests 300 --seed 18 --concurrency 8`.
    report = fuzz.fuzz(300, seed=18, concurrency=8)
    assert report["requests"] == 300
    assert report["endpoints_missed"] == []
    failures = {kind: report[kind] for kind in fuzz.ZERO if report[kind]}
    details = {key: report[key] for key in ("examples", "tracebacks", "log_errors")}
    assert not failures, json.dumps({**failures, **details}, indent=1, ensure_ascii=True)

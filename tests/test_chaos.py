"""``bench/chaos.py`` in small: 30 turns stopped, interrupted, disconnected, failing tools and model
cuts, against a real ``rtagent serve`` and a real model server over HTTP.

The same script as the full run (1,000 turns), run as it is, so the benchmark's own machinery is
checked too, in about 20 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"


def test_a_small_chaos_run_keeps_histories_whole_and_leaks_nothing() -> None:
    command = [sys.executable, str(BENCH), "--turns", "30", "--concurrency", "10", "--warmup-turns", "6"]
    command += ["--keepalive-s", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert run.returncode in (0, 1), run.stderr
    report = json.loads(run.stdout)
    assert report["turns"] == 30
    assert sum(kind["turns"] for kind in report["kinds"].values()) == 30
    assert report["failures"] == [], json.dumps({k: report[k] for k in ("failures", "history", "leaks")})
    assert run.returncode == 0

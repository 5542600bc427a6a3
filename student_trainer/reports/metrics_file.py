"""A run's metrics.jsonl: one JSON record per line (a step's metrics, an eval, the final summary).

The run log appends it (run_log.py); plots, scripts/reproduce.py and the tests read it back here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in the order written."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

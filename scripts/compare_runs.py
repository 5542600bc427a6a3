"""Paired comparison of two sets of finished runs, seed by seed: `A-seed{s}` against `B-seed{s}`.

For rows `make reproduce` did not run side by side (a sweep point against a baseline of results.md):

    python scripts/compare_runs.py runs/sweep-weak/point3/trb runs/reproduce/opd --seeds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.reproduce import paired_cells, run_stats  # noqa: E402


def compare(a: str, b: str, seeds: int) -> str:
    """A markdown row: Δ final accuracy and Δ area (A − B) with 95% bootstrap intervals, seeds A leads."""
    sa = [run_stats(Path(f"{a}-seed{s}"), 0) for s in range(seeds)]
    sb = [run_stats(Path(f"{b}-seed{s}"), 0) for s in range(seeds)]
    return f"| {a} | {b} | {paired_cells(sa, sb)} |"

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="run folder prefix: A-seed0, A-seed1, ...")
    parser.add_argument("b", help="the baseline's run folder prefix")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print("| A | B | Δ final accuracy | Δ area under curve | A ahead (area) |\n| --- | --- | --- | --- | --- |")
    print(compare(args.a, args.b, args.seeds))


if __name__ == "__main__":
    main()

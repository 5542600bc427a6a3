"""PNG plots of a run (accuracy, probe KL, ε, mean β over steps) and of several runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from student_trainer.reports.metrics_file import read_metrics  # noqa: E402

PANELS = [("eval_accuracy", "greedy accuracy (held out)"), ("probe_kl", "KL(π_S ‖ π_T) on the probe set"),
          ("eps", "KL budget ε"), ("beta_mean", "mean β of the behavior")]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Four panels from `run_dir/metrics.jsonl`; returns the PNG path."""
    records = read_metrics(run_dir / "metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="o" if key in ("eval_accuracy", "probe_kl") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(runs: dict[str, list[Path]], out: Path,
                    keys: tuple[str, ...] = ("eval_accuracy", "probe_kl")) -> Path:
    """One panel per key: the mean over seeds of each method, with its 95% t-interval as a band."""
    import numpy as np

    from student_trainer.reports.stats import t975

    fig, axes = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        for method, dirs in runs.items():
            curves = [_series(read_metrics(d / "metrics.jsonl"), key) for d in dirs]
            steps = curves[0][0]
            ys = np.array([c[1][: len(steps)] for c in curves])
            mean = ys.mean(0)
            half = t975(len(dirs) - 1) * ys.std(0, ddof=1) / np.sqrt(len(dirs)) if len(dirs) > 1 else 0 * mean
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - half, mean + half, alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(dict(PANELS).get(key, key))
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"mean over {len(next(iter(runs.values())))} seeds, 95% interval bands")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

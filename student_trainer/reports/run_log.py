"""Where a run reports: metrics.jsonl (always), the trackers of train.report_to (trackers.py), a live progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from student_trainer.reports.metrics_file import read_metrics
from student_trainer.reports.trackers import Tracker, scalars


class RunLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 console: Console | None = None, trackers: list[Tracker] = ()) -> None:
        self.out_dir, self.path = out_dir, out_dir / "metrics.jsonl"
        self.trackers, self._step = list(trackers), start_step
        self.console = console or Console(stderr=True)
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a")
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  ε {task.fields[eps]}  β {task.fields[beta]}  "
                       "{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not progress,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                             loss="-", eps="-", beta="-", tps="-")
        self._progress.start()

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._step = record["step"]
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def advance(self, record: dict[str, Any]) -> None:
        self._progress.update(self._task, advance=1, loss=f"{record['loss']:.4f}", eps=f"{record['eps']:.3g}",
                              beta=f"{record.get('beta_mean', 0.0):.2f}", tps=f"{record['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self._progress.console.print(text)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._progress.stop()
        self._file.close()
        if self.trackers:
            self._send_plot()
        for tracker in self.trackers:
            tracker.close()
        if summary:
            table = Table(title="run summary", show_header=False)
            for key, value in summary.items():
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            self.console.print(table)

    def _send_plot(self) -> None:
        """training.png (plots.plot_run) to every tracker, drawn from metrics.jsonl as it stands."""
        from student_trainer.reports.plots import plot_run  # matplotlib: only when a tracker wants the plot

        png = plot_run(self.out_dir)
        for tracker in self.trackers:
            tracker.log_image(png, self._step)


class NullLog:
    """RunLog's interface, writing nothing: where ranks other than 0 report."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def advance(self, record: dict[str, Any]) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self, summary: dict[str, Any] | None = None) -> None:
        pass


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step`: a run killed after logging a step but before checkpointing it
    repeats that step on resume, and the log must not hold it twice."""
    if not path.exists():
        return
    if step == 0:  # a fresh run in an old folder starts a fresh log
        path.unlink()
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step and not r.get("final")]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def quiet_transformers() -> None:
    """Silence transformers' own `Loading weights` / `Writing model shards` bars: they would repeat
    through the run's output between our progress bar and its summary, at every eval and checkpoint."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

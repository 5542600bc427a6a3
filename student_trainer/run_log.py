"""Where a run reports: metrics.jsonl (always), TensorBoard (when installed), a live progress bar."""

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


class RunLog:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 console: Console | None = None) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.console = console or Console(stderr=True)
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            pass
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  ε {task.fields[eps]}  β {task.fields[beta]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not progress,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                             loss="-", eps="-", beta="-", tps="-")
        self._progress.start()

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def advance(self, record: dict[str, Any]) -> None:
        self._progress.update(self._task, advance=1, loss=f"{record['loss']:.4f}", eps=f"{record['eps']:.3g}",
                              beta=f"{record.get('beta_mean', 0.0):.2f}", tps=f"{record['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        self._progress.console.print(text)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._progress.stop()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if summary:
            table = Table(title="run summary", show_header=False)
            for key, value in summary.items():
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            self.console.print(table)


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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

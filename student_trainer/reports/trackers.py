"""Experiment trackers a run also reports to (`train.report_to`): TensorBoard, W&B, trackio, MLflow.

Each receives what metrics.jsonl holds (every numeric field of every record, at its step), the run's
config at start, and the training plot at the end. None is a dependency: each is an optional extra,
imported only when named, and `check_installed` (run by config validation) turns a missing one into
one line at start instead of an ImportError after the first steps.

Where each writes, without network when configured so: TensorBoard in `out_dir/tensorboard`;
W&B in `out_dir/wandb` (WANDB_MODE=offline for no network; `wandb sync` later); trackio in its local
store (TRACKIO_DIR); MLflow in MLFLOW_TRACKING_URI (a `file:` store or a server).
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
PLOT_KEY = "training_plot"


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(_MODULE[name]) is not None
    except ValueError:  # a module set to None in sys.modules: blocked, as if absent
        return False


def check_installed(names: list[str]) -> None:
    """ValueError naming the first tracker that is not importable, and the extra that brings it."""
    for name in names:
        if not installed(name):
            raise ValueError(f"{name} is not installed; pip install 'trb-distill[{name}]' or drop it from the list")


def resolve(report_to: list[str] | None) -> list[str]:
    """None is the default: TensorBoard when it is installed, as runs always did; a list is taken as given."""
    if report_to is None:
        return ["tensorboard"] if installed("tensorboard") else []
    return list(report_to)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record (booleans as 0/1), less `step` and the `final` marker."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", "final")}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def log_image(self, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any], run_name: str, project: str, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, path: Path, step: int) -> None:
        import matplotlib.image

        self.writer.add_image(PLOT_KEY, matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _LibraryRun:
    """W&B and trackio share one API: `lib.init(...)` returns a run with log / finish, and `lib.Image`."""

    lib: Any
    run: Any

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, path: Path, step: int) -> None:
        self.run.log({PLOT_KEY: self.lib.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class WandB(_LibraryRun):
    def __init__(self, out: Path, config: dict[str, Any], run_name: str, project: str, ids: dict[str, str]) -> None:
        import wandb

        self.lib = wandb
        ids.setdefault("wandb", uuid.uuid4().hex[:12])  # the same W&B run on --resume
        self.run = wandb.init(project=project, name=run_name, dir=str(out), config=config, id=ids["wandb"],
                              resume="allow")


class Trackio(_LibraryRun):
    def __init__(self, out: Path, config: dict[str, Any], run_name: str, project: str, ids: dict[str, str]) -> None:
        import trackio

        self.lib = trackio
        self.run = trackio.init(project=project, name=run_name, config=config, resume="allow",
                                auto_log_cpu=False, auto_log_gpu=False)


class MLflow:
    """Through MlflowClient, not the `mlflow.*` globals: one run per object, nothing left active."""

    def __init__(self, out: Path, config: dict[str, Any], run_name: str, project: str, ids: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if "mlflow" not in ids:  # a resumed run keeps logging to the same MLflow run
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            ids["mlflow"] = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.run_id = ids["mlflow"]
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_image(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


def open_trackers(names: list[str], out: Path, config: dict[str, Any], run_name: str, project: str,
                  resume: bool = False) -> list[Tracker]:
    """Start each named tracker; run ids go to out/trackers.json so that --resume continues the same runs."""
    ids_path = out / "trackers.json"
    ids = json.loads(ids_path.read_text()) if resume and ids_path.exists() else {}
    trackers = [_CLASSES[name](out, config, run_name, project, ids) for name in names]
    if ids:
        ids_path.write_text(json.dumps(ids))
    return trackers

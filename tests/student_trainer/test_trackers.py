"""train.report_to: a real 2-step run reports to every installed tracker in its offline/local mode, and
what each one stored reads back as metrics.jsonl's scalars, the config and the training plot.
A tracker that is not installed is skipped here and refused at config time in a run."""

from __future__ import annotations

import glob
import json
import struct
import uuid
from pathlib import Path

import pytest

from student_trainer.config import ConfigError, load_config
from student_trainer.reports import trackers
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.training.loop import train_sync

STEPS = 2
# trackio keeps its store where TRACKIO_DIR pointed when it was first imported, which may be a shared
# default from an earlier test: a project of this session's own keeps other sessions' runs out of it
PROJECT = f"trackers-test-{uuid.uuid4().hex[:8]}"


def test_scalars_are_the_numeric_fields_less_step_and_final() -> None:
    record = {"step": 3, "method": "trb", "loss": 0.5, "tokens": 7, "skipped": False, "final": True, "x": None}
    assert trackers.scalars(record) == {"loss": 0.5, "tokens": 7.0, "skipped": 0.0}


def test_a_missing_tracker_fails_at_config_time_naming_the_key_and_extra(monkeypatch) -> None:
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    base = ["student.path=x", "teacher.model=y"]
    with pytest.raises(ConfigError, match=r"train\.report_to: wandb is not installed; .*'trb-distill\[wandb\]'"):
        load_config(None, [*base, "train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"train\.report_to"):
        load_config(None, [*base, "train.report_to=[comet]"])
    assert load_config(None, [*base, "train.report_to=[]"]).train.report_to == []
    assert load_config(None, base).train.report_to is None  # the default: tensorboard when installed


def test_the_default_is_tensorboard_only_when_installed(monkeypatch) -> None:
    monkeypatch.setattr(trackers, "installed", lambda name: False)
    assert trackers.resolve(None) == []
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    assert trackers.resolve(None) == ["tensorboard"]
    assert trackers.resolve(["mlflow"]) == ["mlflow"]


class _Fake:
    """A tracker that records what it gets, and takes a run id the way W&B and MLflow do."""

    def __init__(self, out, config, run_name, project, ids) -> None:
        self.id = ids.setdefault("fake", f"run-{len(list(out.glob('*')))}")
        self.logged, self.images, self.closed = [], [], False

    def log(self, values, step) -> None:
        self.logged.append((step, values))

    def log_image(self, path, step) -> None:
        self.images.append((path.name, step))

    def close(self) -> None:
        self.closed = True


def test_run_log_feeds_trackers_and_resume_keeps_their_run_ids(tmp_path, monkeypatch) -> None:
    from student_trainer.reports.run_log import RunLog

    monkeypatch.setitem(trackers._CLASSES, "fake", _Fake)
    (fake,) = trackers.open_trackers(["fake"], tmp_path, {}, "run", "p")
    log = RunLog(tmp_path, 2, progress=False, trackers=[fake])
    log.log({"step": 0, "probe_kl": 0.5})
    log.log({"step": 1, "loss": 1.0, "method": "trb", "skipped": False})
    log.close()
    assert fake.logged == [(0, {"probe_kl": 0.5}), (1, {"loss": 1.0, "skipped": 0.0})]
    assert fake.images == [("training.png", 1)] and fake.closed and (tmp_path / "training.png").exists()
    (again,) = trackers.open_trackers(["fake"], tmp_path, {}, "run", "p", resume=True)
    assert again.id == fake.id  # --resume: the same tracker run
    (fresh,) = trackers.open_trackers(["fake"], tmp_path, {}, "run", "p")
    assert fresh.id != fake.id  # a fresh run in an old folder: a new one


@pytest.fixture(scope="module")
def tracked_run(task_models, task_teacher, tmp_path_factory) -> Path:
    """One short run reporting to every installed tracker (none installed: nothing to read back)."""
    names = [name for name in trackers.TRACKERS if trackers.installed(name)]
    if not names:
        pytest.skip("no tracker installed")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("TRACKIO_DIR", str(root / "trackio"))
        env.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it
        cfg = load_config(None, [f"student.path={task_models[1]}", f"teacher.url={task_teacher.url}",
                                 "teacher.top_k=8", "train.batch_size=2", "train.max_new_tokens=6",
                                 f"train.steps={STEPS}", "train.eval_every=0", "train.save_every=0",
                                 f"train.out_dir={root / 'run'}", "train.progress=false", "data.eval_size=2",
                                 "data.probe_size=2", f"train.report_to={json.dumps(names)}",
                                 f"train.tracker_project={PROJECT}"])
        train_sync(cfg)
    return root


def _expected(root: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {key: {step: value}} over the numeric fields the trackers get."""
    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(root / "run" / "metrics.jsonl"):
        for key, value in trackers.scalars(record).items():
            series.setdefault(key, {})[record["step"]] = value
    assert {"loss", "eps", "grad_norm", "probe_kl", "eval_accuracy"} <= series.keys()
    assert sorted(series["loss"]) == list(range(1, STEPS + 1))
    return series


def _same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_tensorboard_holds_the_scalars_config_and_plot(tracked_run: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    _same(got, _expected(tracked_run))
    assert events.Tags()["images"] == [trackers.PLOT_KEY]
    assert "config/text_summary" in events.Tags()["tensors"]


def _wandb_records(path: str):
    """The protobuf records of an offline .wandb file (a LevelDB-style log: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf = Path(path).read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, else middle / last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb 0.31 fills nested_key


def test_wandb_offline_run_holds_the_scalars_config_and_plot(tracked_run: Path) -> None:
    pytest.importorskip("wandb")
    (path,) = glob.glob(str(tracked_run / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    got: dict[str, dict[int, float]] = {}
    config, plots = {}, 0
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
        if kind == "history":
            items = {_key(item): json.loads(item.value_json) for item in record.history.item}
            plots += items.get(f"{trackers.PLOT_KEY}/_type") == "image-file"  # an image: nested keys
            for key, value in items.items():
                if not key.startswith(("_", trackers.PLOT_KEY)):
                    got.setdefault(key, {})[record.history.step.num] = value
    _same(got, _expected(tracked_run))
    assert config["train"]["steps"] == STEPS and "api_key" not in config["teacher"]
    assert plots == 1


def test_trackio_local_store_holds_the_scalars_config_and_plot(tracked_run: Path) -> None:
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(PROJECT, "run")
    got: dict[str, dict[int, float]] = {}
    for entry in logs:
        for key, value in entry.items():
            if key not in ("step", "timestamp", trackers.PLOT_KEY):
                got.setdefault(key, {})[entry["step"]] = value
    _same(got, _expected(tracked_run))
    assert sum(trackers.PLOT_KEY in entry for entry in logs) == 1
    assert SQLiteStorage.get_run_config(PROJECT, "run")["train"]["steps"] == STEPS


def test_mlflow_file_store_holds_the_scalars_config_and_plot(tracked_run: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{tracked_run / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    got = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}
    _same(got, _expected(tracked_run))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.json", "training.png"}
    assert run.info.status == "FINISHED"

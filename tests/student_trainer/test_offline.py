"""Offline distillation: `trb-train export` against a real teacher server, its resumption after a
crash, and `method.name=offline_kd` training on the export with the loss of the same batches scored live."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from student_trainer.config import ConfigError, load_config
from student_trainer.reports.metrics_file import read_metrics
from student_trainer.rollouts.targets import score_targets
from student_trainer.tasks import arithmetic
from student_trainer.tasks.math_data import DataError
from student_trainer.teacher import export as offline_export
from student_trainer.teacher.client import TeacherClient
from student_trainer.teacher.export import Example, export, load_shards, read_examples
from student_trainer.training.learner import train_step
from student_trainer.training.loop import train_sync
from student_trainer.training.run import assemble

K = 8
ROWS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Arithmetic prompts with reference solutions as the completions, as text rows."""
    path = tmp_path_factory.mktemp("offline") / "pairs.jsonl"
    rows = [{"prompt": p.prompt, "completion": p.solution} for p in arithmetic.generate(ROWS, seed=3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def exported(task_models, task_teacher, dataset, tmp_path_factory) -> Path:
    """The export through the CLI, as a user runs it: 3 shards of up to 4 rows."""
    out = tmp_path_factory.mktemp("export")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "student_trainer.cli", "export", "--url", task_teacher.url,
                           "--data", str(dataset), "--tokenizer", str(task_models[1]), "--out", str(out),
                           "--top-k", str(K), "--shard-rows", "4", "--batch-rows", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == ROWS
    return out


def test_export_holds_each_rows_teacher_top_k(task_models, task_teacher, dataset, exported) -> None:
    tok = AutoTokenizer.from_pretrained(task_models[1])
    examples = read_examples(dataset, tok)
    shards = load_shards(exported)
    assert sorted(p.name for p in exported.glob("shard_*")) == [f"shard_0000{i}.safetensors" for i in range(3)]
    assert shards["top_ids"].shape == (sum(len(e.completion) for e in examples), K)

    async def direct() -> list:
        async with TeacherClient(task_teacher.url) as client:
            return [(await offline_export.score_rows(client, [e], K))[0] for e in examples]

    offset = 0
    for r, (e, want) in enumerate(zip(examples, asyncio.run(direct()), strict=True)):
        seq = shards["tokens"][shards["seq_offsets"][r] : shards["seq_offsets"][r + 1]].tolist()
        assert seq == e.prompt + e.completion and int(shards["prompt_lens"][r]) == len(e.prompt)
        n = len(e.completion)
        assert torch.equal(shards["top_ids"][offset : offset + n].long(), want["ids"])
        assert torch.allclose(shards["top_logprobs"][offset : offset + n], want["logprobs"], atol=1e-5)
        assert torch.allclose(shards["tail_logprob"][offset : offset + n], want["tail"], atol=1e-5)
        offset += n


def test_an_export_resumes_after_a_crash_without_repeating_rows(task_models, task_teacher, dataset, exported,
                                                                 tmp_path, monkeypatch) -> None:
    examples = read_examples(dataset, AutoTokenizer.from_pretrained(task_models[1]))
    real, calls = offline_export.score_rows, []

    async def crashing(client, batch, top_k):
        calls.append(len(batch))
        if len(calls) == 3:  # rows 0-2, 3 (shard 0 written), then rows 4-6 of shard 1: the crash
            raise RuntimeError("killed")
        return await real(client, batch, top_k)

    async def run(out: Path) -> dict:
        async with TeacherClient(task_teacher.url) as client:
            return await export(client, examples, out, K, shard_rows=4, batch_rows=3)

    monkeypatch.setattr(offline_export, "score_rows", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        asyncio.run(run(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["shard_00000.safetensors"]  # whole shards only, no manifest
    with pytest.raises(DataError, match="unfinished"):
        load_shards(tmp_path)
    monkeypatch.setattr(offline_export, "score_rows", real)
    calls.clear()
    manifest = asyncio.run(run(tmp_path))
    assert manifest["rows"] == ROWS and manifest["shards"] == 3
    resumed, whole = load_shards(tmp_path), load_shards(exported)  # load_shards checks rows 0..N-1 once each
    assert torch.equal(resumed["row_index"], torch.arange(ROWS))
    assert torch.equal(resumed["tokens"], whole["tokens"]) and torch.equal(resumed["top_ids"], whole["top_ids"])
    assert torch.allclose(resumed["top_logprobs"], whole["top_logprobs"], atol=1e-5)
    with pytest.raises(DataError, match="top_k"):  # a rerun with other settings is refused, not mixed in
        asyncio.run(export(None, examples, tmp_path, K + 1, shard_rows=4))


def test_bad_rows_name_the_row(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_ids": [1, 2], "completion_ids": [3]}\n{"prompt": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: needs prompt and completion"):
        read_examples(path)
    path.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(DataError, match="--tokenizer"):
        read_examples(path)
    path.write_text('{"prompt_ids": [1, 2], "completion_ids": []}\n')
    with pytest.raises(DataError, match="empty"):
        read_examples(path)
    path.write_text('{"prompt_ids": [1, 2], "completion_ids": [3]}\n')
    assert read_examples(path) == [Example([1, 2], [3])]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    table = pyarrow.table({"prompt_ids": [[1, 2], [4]], "completion_ids": [[3], [5, 6]]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert read_examples(tmp_path / "p.parquet") == [Example([1, 2], [3]), Example([4], [5, 6])]


def _cfg(task_models, url: str, out: Path, offline: Path, *extra: str):
    return load_config(None, [f"student.path={task_models[1]}", f"teacher.url={url}", f"teacher.top_k={K}",
                              "method.name=offline_kd", f"data.offline_path={offline}", "train.batch_size=4",
                              "train.max_new_tokens=12", "train.eval_every=0", "train.save_every=0",
                              f"train.out_dir={out}", "train.progress=false", "optim.lr=0.01",
                              "data.eval_size=4", "data.probe_size=4", "train.report_to=[]", *extra])


def test_offline_kd_needs_an_export() -> None:
    with pytest.raises(ConfigError, match=r"data\.offline_path"):
        load_config(None, ["student.path=x", "teacher.model=y", "method.name=offline_kd"])


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_offline_steps_have_the_loss_of_the_same_batches_scored_live(task_models, task_teacher, exported,
                                                                     tmp_path, loss) -> None:
    """Three optimizer steps on stored targets, then the same three on the same batches rescored by the
    teacher now: equal losses and gradient norms (the stored targets sit at the right positions)."""
    cfg = _cfg(task_models, task_teacher.url, tmp_path, exported, f"method.offline_loss={loss}",
               "optim.accum_steps=2")

    async def steps(live: bool) -> list[tuple[float, float]]:
        tok = AutoTokenizer.from_pretrained(task_models[1])
        async with TeacherClient(task_teacher.url) as client:
            run = assemble(cfg, AutoModelForCausalLM.from_pretrained(task_models[1]), tok, client, tmp_path)
            if live:
                stored = run.offline.rollouts
                batches = {}
                for step in range(3):
                    batches[step] = stored(step, 4, range(4), 4)
                    for r in batches[step]:
                        r.targets = await score_targets(r, client, K, tok.pad_token_id)
                run.offline.rollouts = lambda step, *_: batches[step]
            out = []
            for _ in range(3):
                record = await train_step(run)
                run.step += 1
                assert record["behavior"] == "offline" and record["loss_fn"] == loss
                out.append((record["loss"], record["grad_norm"]))
            return out

    offline, live = asyncio.run(steps(False)), asyncio.run(steps(True))
    flat = [x for pair in offline for x in pair]
    assert flat == pytest.approx([x for pair in live for x in pair], rel=1e-5, abs=1e-7)
    assert offline[-1][0] < offline[0][0]  # and it learns


def test_offline_kd_run_end_to_end(task_models, task_teacher, exported, tmp_path) -> None:
    summary = train_sync(_cfg(task_models, task_teacher.url, tmp_path / "run", exported, "train.steps=3"))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert summary["steps"] == 3 and [r["behavior"] for r in records] == ["offline"] * 3
    assert all(r["loss"] > 0 and not r["skipped"] for r in records)

"""`trb-train --check`: everything a run needs, checked in the order a run meets it, then the plan.

It validates the config, loads the student, starts or reaches the teacher, compares tokenizer
fingerprints and the teacher's limits with the config, builds the data, and prints what a run
would do (steps, rollouts, tokens, eval, where checkpoints go). It writes nothing and trains nothing,
so it fits before a long job or a compose stack: a mistake costs seconds, not the first eval.
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.protocol import ModelInfo
from student_trainer import startup
from student_trainer.config import DEFAULT_TEACHER, Config
from student_trainer.data import TaskData
from student_trainer.reports import trackers
from student_trainer.rollouts.pipeline import producer_device
from student_trainer.training import checkpoint
from student_trainer.training.run import TrainingError


def _method(cfg: Config) -> str:
    m = cfg.method
    return {"opd": "opd: the student samples every rollout token",
            "trb": f"trb: blend eps {m.eps0} annealed ({m.schedule}) to 0 over {m.horizon} steps, then as opd",
            "fixed_eps": f"fixed_eps: blend at a constant eps {m.eps0}",
            "skd": f"skd: the student proposes, the teacher's top-{m.skd_top_k} accepts or the teacher samples",
            "sft_warmup": f"sft_warmup: teacher rollouts for {m.horizon} steps, then as opd",
            "teacher_warmup": f"teacher_warmup: teacher rollouts for {m.horizon} steps, then as opd",
            "veto": f"veto: student rollouts, {m.veto_divergence} KL to the veto target from beta {m.veto_beta}",
            "offline_kd": f"offline_kd: no rollouts; stored completions and teacher top-k from "
                          f"{cfg.data.offline_path} ({m.offline_loss})"}.get(m.name, m.name)


def _teacher_limits(cfg: Config, info: ModelInfo, longest: int) -> None:
    """The teacher's limits that would stop a run at its first request, not here."""
    if cfg.teacher.top_k > info.max_top_k:
        raise TrainingError(f"teacher.top_k={cfg.teacher.top_k} exceeds the teacher's max_top_k={info.max_top_k}")
    if longest > info.max_context:
        raise TrainingError(f"the longest rollout ({longest} tokens: prompt + train.max_new_tokens) exceeds the "
                            f"teacher's max_context={info.max_context}; lower train.max_new_tokens")


def _data(cfg: Config, tokenizer: Any) -> tuple[str, int]:
    """A line on the data and the longest step-1 prompt in tokens."""
    data = TaskData(cfg.data, tokenizer)
    batch = data.train_batch(0, cfg.train.batch_size)
    lens = [len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"]) for p in batch]
    pool = f", {len(data._math.train)} training problems" if data._math else ""
    line = (f"{cfg.data.task}{pool}; step 1: {len(batch)} prompts of {min(lens)}-{max(lens)} tokens "
            f"(mean {sum(lens) / len(lens):.1f}); eval {len(data.eval_set())} problems, probe {len(data.probe_set())}")
    return line, max(lens)


def _checkpoints(cfg: Config, out: Path, ckpt: Path | None, resume: bool) -> str:
    t = cfg.train
    every = f"every {t.save_every} steps and at the end" if t.save_every else "at the end"
    line = f"{out / 'checkpoints'}/step_NNNNNN {every}, newest {t.keep_checkpoints} kept"
    if resume:
        return line + f"; --resume continues from {ckpt.name}"
    existing = checkpoint.latest(out / "checkpoints")
    if existing is not None:
        line += f"; {existing.name} is already there: without --resume the run starts over from step 0"
    return line


async def check(cfg: Config, resume: bool = False) -> list[str]:
    """The plan as lines ("key  value"); a TrainingError, TeacherError or ModelSourceError at the first problem."""
    out = Path(cfg.train.out_dir)
    found = startup.check_sources(cfg, student=not resume)
    producer_device(cfg.student.rollout_device, torch.device(cfg.student.device))  # ConfigError when missing
    startup.grader_note(cfg)
    ckpt = checkpoint.latest(out / "checkpoints") if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    source = str(ckpt) if ckpt else cfg.student.path
    startup.say(f"loading the student from {source}")
    student = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cfg.student.dtype))
    student.to(cfg.student.device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    params = sum(p.numel() for p in student.parameters())
    how = {"local": "local folder", "cache": "hub id, cached", "hub": "hub id"}.get(found.get("student.path"),
                                                                                 "checkpoint")
    lines = [("student", f"{source} ({how}): {params / 1e6:.2f}M parameters, {cfg.student.dtype} on "
                         f"{cfg.student.device}")]
    data_line, longest_prompt = _data(cfg, tokenizer)
    def log_of(tid: str) -> Path:
        return Path(tempfile.gettempdir()) / f"trb-check-teacher-{tid}-{out.name}.log"

    with startup.serving_local_teachers(cfg, log_of) as local:
        async with AsyncExitStack() as stack:
            urls = startup.teacher_urls(cfg, local)
            teachers = await startup.open_teachers(stack, cfg, urls, "trainer:check", tokenizer)
            info = await teachers[DEFAULT_TEACHER].model_info()
    _teacher_limits(cfg, info, longest_prompt + cfg.train.max_new_tokens)
    where = f"{', '.join(cfg.teacher.urls)}: {info.model}" if cfg.teacher.urls else \
        f"{cfg.teacher.model} (a local server, started and stopped)"
    t = cfg.train
    evals = f"every {t.eval_every} steps, " if t.eval_every else ""
    tail = "exact tails" if info.tail == "exact" else f"tails rebuilt from the top-k (mass within {info.tail_bound:g})"
    lines += [("teacher", f"{where}: {info.backend} ({info.dtype}), vocab {info.vocab_size}, max_context "
                          f"{info.max_context}, {'sessions' if info.sessions else 'no sessions'}, {tail}, "
                          f"tokenizer fingerprint {info.tokenizer_fingerprint} = the student's"),
              *[(f"teacher {tid}", f"{', '.join(urls[tid])}: ready, the student's tokenizer, scores the rows "
                                   f"whose prompt contains {[k for k, v in cfg.teacher.route.items() if v == tid]}")
                for tid in cfg.teacher.others],
              ("method", _method(cfg)),
              ("data", data_line),
              ("run", f"{t.steps} steps x {t.batch_size} rollouts = {t.steps * t.batch_size} rollouts of up to "
                      f"{t.max_new_tokens} new tokens ({t.steps * t.batch_size * t.max_new_tokens:,} at most), "
                      f"teacher top-{cfg.teacher.top_k}"),
              ("eval", f"{'' if resume else 'at the start, '}{evals}at the end: accuracy and probe KL"),
              ("checkpoints", _checkpoints(cfg, out, ckpt, resume)),
              ("trackers", ", ".join(trackers.resolve(t.report_to)) or "none (metrics.jsonl only)")]
    return [f"  {key:<12} {value}" for key, value in lines]

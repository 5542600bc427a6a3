"""Target 5: one OPD training step vs one step of TRL's GKD trainer (lmbda = 1, beta = 1).

    .venv/bin/pip install -e '.[bench]'      # TRL (keep torch as installed: add -c constraints.txt)
    .venv/bin/python -m bench.bench_step_vs_trl

Both sides do the same work per step: the student samples `max_new` tokens for each of `batch`
arithmetic prompts (EOS disabled on both sides, so every response has exactly that length), the
teacher scores the rollouts, and one AdamW step minimises the reverse KL (fully on-policy).

- OPD: `student_trainer.train.train_step` as shipped: KV-cache rollout, one `/v1/score` call to a
  teacher server subprocess on 127.0.0.1 (msgpack, top-20), the top-k reverse KL, AdamW.
- TRL: `GKDTrainer` with lmbda = 1 (always on-policy), beta = 1 (reverse KL), temperature 1, the
  teacher in process (full-vocabulary logits), `adamw_torch`, constant LR, the same grad clip.

A step is timed from TRL's `on_step_begin` to `on_step_end` (after its data loader: favourable to
TRL) and as the whole `train_step` call for OPD. Blocks of steps alternate between the two.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Section,
    base_parser,
    limit_threads,
    machine_info,
    median,
    report,
    run_sync,
    spread,
    teacher_server,
    tiny_model,
)
from student_trainer.config import Config, MethodCfg, OptimCfg, StudentCfg, TeacherCfg, TrainCfg
from student_trainer.data import TaskData
from student_trainer.tasks.tokenizer import build_tokenizer
from student_trainer.teacher_client import TeacherClient
from student_trainer.train import Run, lr_lambda, train_step

LR, CLIP, TOP_K = 1e-3, 1.0, 20


class NoEosTokenizer:
    """The task tokenizer with an EOS id no sample can equal, so OPD responses are full length."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = -1
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)


def _student(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


# ---- OPD ---------------------------------------------------------------------------------------
def opd_run(student: Path, client: TeacherClient, url: str, batch: int, max_new: int, threads: int) -> Run:
    """A `Run` as `train()` builds it, method opd, without the eval / checkpoint machinery."""
    cfg = Config(student=StudentCfg(path=str(student)), teacher=TeacherCfg(url=url, top_k=TOP_K),
                 method=MethodCfg(name="opd"), optim=OptimCfg(lr=LR, grad_clip=CLIP),
                 train=TrainCfg(batch_size=batch, max_new_tokens=max_new, threads=threads, progress=False))
    model = _student(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return Run(cfg, Path(tempfile.mkdtemp(prefix="opd-bench-")), model, NoEosTokenizer(build_tokenizer()), client,
               optimizer, scheduler, TaskData(cfg.data))


def opd_block(run: Run, loop: asyncio.Runner, steps: int) -> list[float]:
    """Wall seconds of `steps` consecutive `train_step` calls."""
    out = []
    for _ in range(steps):
        started = time.perf_counter()
        record = run_sync(loop, train_step(run))
        out.append(time.perf_counter() - started)
        assert record["tokens"] == run.cfg.train.batch_size * run.cfg.train.max_new_tokens, record["tokens"]
        run.step += 1
    return out


# ---- TRL ---------------------------------------------------------------------------------------
def _collator(tokenizer: Any, max_new: int) -> Any:
    """Left-padded prompts in the keys GKD's on-policy branch reads (the rest is replaced by it).

    The Trainer normalises the loss by the number of label tokens it counts in the *collated* batch
    (`num_items_in_batch`), not in the on-policy generation that replaces it; prompt-only labels
    would make that 0 and the loss infinite. `shift_labels` therefore declares the batch x max_new
    generated tokens, which makes TRL's normalisation the token mean that OPD uses.
    """

    def collate(examples: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        ids = [tokenizer(e["prompt"], add_special_tokens=False)["input_ids"] for e in examples]
        width = max(len(x) for x in ids)
        prompts = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(prompts)
        for b, x in enumerate(ids):
            prompts[b, width - len(x) :], mask[b, width - len(x) :] = torch.tensor(x), 1
        return {"prompts": prompts, "prompt_attention_mask": mask, "input_ids": prompts,
                "attention_mask": mask, "labels": torch.full_like(prompts, -100),
                "shift_labels": torch.zeros((len(ids), max_new), dtype=torch.long)}

    return collate


def _step_clock() -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Seconds from on_step_begin to on_step_end of every optimizer step."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._begin = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._begin = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self._begin)

    return StepClock()


def trl_block(student: Path, teacher: torch.nn.Module, prompts: list[str], batch: int, max_new: int,
              steps: int) -> list[float]:
    """Wall seconds of `steps` GKD steps (a fresh trainer; its first step is dropped as warm-up)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # TRL releases before GKD moved to trl.experimental
        from trl import GKDConfig, GKDTrainer

    tokenizer = build_tokenizer()
    model = _student(student)
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="gkd-bench-"), per_device_train_batch_size=batch,
                     max_steps=steps + 1, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=max_new,
                     learning_rate=LR, max_grad_norm=CLIP, optim="adamw_torch", lr_scheduler_type="constant",
                     weight_decay=0.0, adam_beta2=0.95, logging_steps=10**6, save_strategy="no", report_to="none",
                     bf16=False, fp16=False, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    clock = _step_clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"prompt": prompts}),
                             data_collator=_collator(tokenizer, max_new), callbacks=[clock])
        # Full-length responses, as on the OPD side (the Trainer re-reads EOS from the tokenizer at init).
        trainer.generation_config.eos_token_id = None
        trainer.model.generation_config.eos_token_id = None
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return clock.times[1:]


def _prompts(n: int) -> list[str]:
    from student_trainer.config import DataCfg

    data = TaskData(DataCfg())
    return [p.prompt for step in range(n) for p in data.train_batch(step, 1)]


# ---- the comparison -----------------------------------------------------------------------------
def run(threads: int = 1, quick: bool = False, batch: int = 32, max_new: int = 96) -> Section:
    limit_threads(threads)
    student, s_prov = tiny_model("student")
    teacher, t_prov = tiny_model("teacher")
    blocks, steps = (1, 2) if quick else (3, 4)
    from bench.common import load_model

    teacher_model = load_model(teacher)
    prompts = _prompts(batch * (steps + 1) * blocks + batch)
    opd, trl = [], []
    with teacher_server(teacher, threads) as server, asyncio.Runner() as loop:
        client = TeacherClient(server.url)
        opd_state = opd_run(student, client, server.url, batch, max_new, threads)
        opd_block(opd_state, loop, 1)  # warm-up
        for _ in range(blocks):
            opd += opd_block(opd_state, loop, steps)
            trl += trl_block(student, teacher_model, prompts, batch, max_new, steps)
        run_sync(loop, client.aclose())
    section = Section("5. One OPD training step vs TRL GKD (lmbda = 1, beta = 1)",
                      f"Student {s_prov}, teacher {t_prov}; batch {batch}, response {max_new} tokens (EOS off), "
                      f"arithmetic prompts, reverse KL, AdamW lr {LR}, clip {CLIP}. OPD: teacher server over HTTP "
                      f"(top-{TOP_K}); TRL: teacher in process (full vocabulary). {blocks} alternating blocks of "
                      f"{steps} steps each.")
    section.add("OPD train_step (rollout + /v1/score + update)", spread(opd))
    section.add("TRL GKDTrainer step (generate + teacher forward + update)", spread(trl))
    section.add("OPD step / TRL step", "", median(opd) / median(trl), "<= 1.0")
    return section


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=96)
    args = ap.parse_args()
    info = machine_info(args.threads)
    print(report([run(args.threads, args.quick, args.batch, args.max_new)], info))


if __name__ == "__main__":
    main()

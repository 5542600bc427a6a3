"""Target 5: one OPD training step vs one step of TRL's `DistillationTrainer` (reverse KL, on-policy).

    .venv/bin/pip install -c constraints.txt -e '.[bench]'   # TRL >= 1.10; -c keeps torch as installed
    .venv/bin/python -m bench.bench_step_vs_trl [--decoder eager] [--stream-chunk 0]   # the steps before

Both sides do the same work per step: the student samples `max_new` tokens for each of `batch`
arithmetic prompts (plain sampling at temperature 1; EOS disabled on both sides, so every response
has exactly that length), the teacher scores every response position, and one AdamW step
(betas 0.9/0.95, no weight decay, constant LR, clip 1.0, float32) minimises the token-mean reverse KL
over the same batch x max_new tokens.

- OPD: `student_trainer.training.loop.train_step` as shipped: KV-cache rollout (`student.decoder` auto: the
  hand-written Qwen3 step on a CPU; `--decoder eager`: transformers' forward) whose teacher targets
  are streamed from a teacher server subprocess on 127.0.0.1 (msgpack, top-20) while it samples
  (`teacher.stream_chunk_tokens`; `--stream-chunk 0`: one `/v1/score` call after sampling), the top-k
  reverse KL, AdamW.
- TRL: `trl.DistillationTrainer`, stable and top-level since TRL 1.10 (it replaced the
  experimental GKDTrainer that this bench used before). What it does per step, read in TRL 1.16.0:
  - `trainer/distillation_config.py`: no `lmbda`: every step is on-policy (the trainer generates
    each batch itself); `beta` 1.0 = reverse KL (L359-366); `temperature` 1.0, `top_p` 1.0,
    `top_k` 0 (L250-263: no logits warper is built, so `generate` samples the plain softmax);
    `max_completion_length` = max_new (L223). `_BaseConfig` turns gradient checkpointing and bf16
    on by default (`trainer/base_config.py` L62-75): both are switched off here, since OPD
    neither recomputes activations nor runs in bf16.
  - `trainer/distillation_trainer.py`: the generation config (L739-757) with the tokenizer's EOS
    added to the model's; `_generate_single_turn` (L1003-1100) calls `model.generate` and cuts the
    mask after the first EOS (L1090); `_prepare_inputs` (L1759) generates once per optimizer step
    at `gradient_accumulation_steps` 1; `_compute_loss` (L1818-1922) runs the student backbone,
    the teacher backbone under `no_grad` (in process, full vocabulary) and `_chunked_divergence_loss`
    (L101-213: generalized JSD on [token x vocab] tiles, summed over the completion tokens and
    divided by their count `num_items_in_batch`, L1597).
  EOS is disabled as on the OPD side: no EOS in TRL's generation config, an empty EOS list for the
  mask, and the model's EOS cleared in `on_train_begin`, after `Trainer.train()` re-aligned it with
  the tokenizer's (transformers' `generate` fills an unset EOS from the model's config). The run
  asserts that every TRL completion has max_new tokens.

A step is timed from TRL's `on_step_begin` to `on_step_end` (after its data loader: favourable to
TRL) and as the whole `train_step` call for OPD. Blocks of steps alternate between the two; each
TRL block builds a fresh trainer and drops its first step (warm-up). CPU seconds count this process
and, for OPD, the teacher server and its model process: on a shared machine the CPU ratio is the
steadier figure, the wall ratio the one the target is on.
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
    Times,
    base_parser,
    cpu_now,
    limit_threads,
    load_model,
    machine_info,
    median,
    process_tree,
    report,
    run_sync,
    spread,
    teacher_server,
    tiny_model,
)
from student_trainer.config import Config, MethodCfg, OptimCfg, StudentCfg, TeacherCfg, TrainCfg
from student_trainer.data import TaskData
from student_trainer.tasks.tokenizer import build_tokenizer
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.learner import train_step
from student_trainer.training.run import Run, lr_lambda

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
def opd_run(student: Path, client: TeacherClient, url: str, batch: int, max_new: int, threads: int,
            decoder: str = "auto", stream_chunk: int | None = None) -> Run:
    """A `Run` as `train()` builds it, method opd, without the eval / checkpoint machinery."""
    stream = {} if stream_chunk is None else {"stream_chunk_tokens": stream_chunk}
    cfg = Config(student=StudentCfg(path=str(student), decoder=decoder),
                 teacher=TeacherCfg(url=url, top_k=TOP_K, **stream),
                 method=MethodCfg(name="opd"), optim=OptimCfg(lr=LR, grad_clip=CLIP),
                 train=TrainCfg(batch_size=batch, max_new_tokens=max_new, threads=threads, progress=False))
    model = _student(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return Run(cfg, Path(tempfile.mkdtemp(prefix="opd-bench-")), model, NoEosTokenizer(build_tokenizer()), client,
               optimizer, scheduler, TaskData(cfg.data))


def opd_block(run: Run, loop: asyncio.Runner, steps: int, server_pid: int) -> Times:
    """Wall seconds of `steps` consecutive `train_step` calls; CPU seconds of this process + the server's."""
    out, pids = Times(), process_tree(server_pid)
    for _ in range(steps):
        wall, cpu = time.perf_counter(), cpu_now(pids)
        record = run_sync(loop, train_step(run))
        out.wall.append(time.perf_counter() - wall)
        out.cpu.append(cpu_now(pids) - cpu)
        assert record["tokens"] == run.cfg.train.batch_size * run.cfg.train.max_new_tokens, record["tokens"]
        run.step += 1
    return out


# ---- TRL ---------------------------------------------------------------------------------------
def _step_clock() -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall and CPU seconds (this process) from on_step_begin to on_step_end of every step, and the logs."""

        def __init__(self) -> None:
            self.times = Times()
            self.logs: dict[str, float] = {}
            self._begin = (0.0, 0.0)

        def on_log(self, *args: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            self.logs.update(logs or {})

        def on_train_begin(self, *args: Any, model: Any = None, **kwargs: Any) -> None:
            # `Trainer.train()` has just re-aligned the model's EOS with the tokenizer's, and `generate`
            # fills the unset EOS of TRL's generation config from the model's: clear it again.
            model.generation_config.eos_token_id = None

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._begin = (time.perf_counter(), time.process_time())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.wall.append(time.perf_counter() - self._begin[0])
            self.times.cpu.append(time.process_time() - self._begin[1])

    return StepClock()


def trl_trainer(student: Path, teacher: torch.nn.Module, prompts: list[str], batch: int, max_new: int,
                steps: int, clock: Any) -> Any:
    """A `DistillationTrainer` set up to do OPD's work per step (see the module docstring)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="distill-bench-"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, max_steps=steps, beta=1.0, temperature=1.0, top_p=1.0, top_k=0,
        max_completion_length=max_new, learning_rate=LR, max_grad_norm=CLIP, optim="adamw_torch",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    tokenizer = build_tokenizer()
    model = _student(student)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": prompts[: batch * steps]}),
                                  callbacks=[clock])
    # Full-length responses, as on the OPD side: no stop on EOS (see also `on_train_begin` of the clock),
    # and no loss mask cut after a sampled EOS.
    trainer.generation_config.eos_token_id = None
    trainer.generation_kwargs["eos_token_id"] = None
    trainer.eos_token_ids = []
    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_block(student: Path, teacher: torch.nn.Module, prompts: list[str], batch: int, max_new: int,
              steps: int) -> Times:
    """Wall and CPU seconds of `steps` DistillationTrainer steps (a fresh trainer; its first step is warm-up)."""
    clock = _step_clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl_trainer(student, teacher, prompts, batch, max_new, steps + 1, clock)
        trainer.train()
    shortest = clock.logs.get("completions/min_length")  # averaged over the steps: max_new iff all are full
    assert shortest == max_new, f"TRL completions shorter than {max_new} tokens: {shortest}"
    return Times(clock.times.wall[1:], clock.times.cpu[1:])


def _prompts(n: int) -> list[str]:
    from student_trainer.config import DataCfg

    data = TaskData(DataCfg())
    return [p.prompt for step in range(n) for p in data.train_batch(step, 1)]


# ---- the comparison -----------------------------------------------------------------------------
def _figure(t: Times, what: str) -> str:
    return f"{spread(t.wall)}; {median(t.cpu) * 1e3:.0f} ms CPU ({what})"


def run(threads: int = 1, quick: bool = False, batch: int = 32, max_new: int = 96, decoder: str = "auto",
        stream_chunk: int | None = None) -> Section:
    limit_threads(threads)
    student, s_prov = tiny_model("student")
    teacher, t_prov = tiny_model("teacher")
    blocks, steps = (1, 2) if quick else (4, 4)
    teacher_model = load_model(teacher)
    prompts = _prompts(batch * (steps + 1))
    opd, trl = Times(), Times()
    with teacher_server(teacher, threads) as server, asyncio.Runner() as loop:
        client = TeacherClient(server.url)
        opd_state = opd_run(student, client, server.url, batch, max_new, threads, decoder, stream_chunk)
        opd_block(opd_state, loop, 1, server.proc.pid)  # warm-up
        for _ in range(blocks):
            for mine, block in ((opd, opd_block(opd_state, loop, steps, server.proc.pid)),
                                (trl, trl_block(student, teacher_model, prompts, batch, max_new, steps))):
                mine.wall += block.wall
                mine.cpu += block.cpu
        run_sync(loop, client.aclose())
    import trl as trl_lib

    section = Section("5. One OPD training step vs TRL DistillationTrainer (reverse KL, fully on-policy)",
                      f"Student {s_prov}, teacher {t_prov}; batch {batch}, response {max_new} tokens (EOS off), "
                      f"arithmetic prompts, reverse KL at temperature 1, AdamW lr {LR} betas (0.9, 0.95), clip "
                      f"{CLIP}, float32. OPD: teacher server over HTTP (top-{TOP_K}); TRL {trl_lib.__version__}: "
                      f"teacher in process (full vocabulary, chunked JSD at beta 1), no gradient checkpointing. "
                      f"{blocks} alternating blocks of {steps} steps each (a fresh TRL trainer per block, its first "
                      f"step dropped). OPD's student.decoder: {decoder}; teacher.stream_chunk_tokens: "
                      f"{opd_state.cfg.teacher.stream_chunk_tokens}.")
    targets = "/v1/score" if opd_state.cfg.teacher.stream_chunk_tokens == 0 else "targets streamed"
    section.add(f"OPD train_step (rollout + {targets} + update)", _figure(opd, "client + server + its model process"))
    section.add("TRL DistillationTrainer step (generate + teacher forward + update)", _figure(trl, "one process"))
    section.add("OPD step / TRL step", "", median(opd.wall) / median(trl.wall), "<= 0.8")
    section.add("same, CPU seconds", "", median(opd.cpu) / median(trl.cpu), "(<= 0.8)")
    return section


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--decoder", default="auto", choices=["auto", "eager", "static", "qwen3"],
                    help="OPD's student.decoder (eager: the generic transformers decoder, the step before qwen3)")
    ap.add_argument("--stream-chunk", type=int, default=None,
                    help="OPD's teacher.stream_chunk_tokens (default: as shipped; 0: one /v1/score after sampling)")
    args = ap.parse_args()
    info = machine_info(args.threads)
    print(report([run(args.threads, args.quick, args.batch, args.max_new, args.decoder, args.stream_chunk)], info))


if __name__ == "__main__":
    main()

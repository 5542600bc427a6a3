"""One whole optimizer step of a recipe, with random-weight models: a student in this process and a
real `trb-teacher serve` (transformers backend) on the same device, measured at two response lengths.

The step is the recipe's (batch, accum_steps, rollout batch, precision, top-k, ε0 at step 1: the
teacher is asked at every token) on arithmetic prompts, since the models are random anyway. A
random student never emits EOS, so every row decodes the full length. Step time is close to linear
in the response length (decode steps, plus an update over prompt + response tokens), so two
lengths give a line that projects the 1,024-token step of the recipe.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import build_random
from student_trainer.config import load_config
from student_trainer.tasks.tokenizer import build_tokenizer
from student_trainer.teacher.client import TeacherClient
from student_trainer.teacher.local import LocalTeacher
from student_trainer.training.learner import train_step
from student_trainer.training.run import assemble


@dataclass
class Fit:
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (new tokens, seconds, tokens/s)

    def at(self, n: int) -> float:
        """Seconds of a step at `n` new tokens, on the line through the two measured points."""
        (n0, t0, _), (n1, t1, _) = self.points[0], self.points[-1]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


def _save_teacher(config, device: str, dtype: torch.dtype, root: Path) -> Path:
    model = build_random(config, device, dtype)
    path = root / "teacher"
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def measure_pair(student_cfg, teacher_cfg, recipe: Path, device: str, lengths: tuple[int, int],
                 teacher_args: tuple[str, ...] = ()) -> Fit:
    """Warm-up step then one timed step at each response length in `lengths`."""
    fit = Fit()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="whole-step-") as tmp:
        root = Path(tmp)
        teacher_path = _save_teacher(teacher_cfg, device, dtype, root)
        server = LocalTeacher(str(teacher_path), "--device", device, "--dtype", str(dtype).removeprefix("torch."),
                              *teacher_args, log=root / "teacher.log")
        try:
            server.wait_ready()
            student = build_random(student_cfg, device)
            for n in lengths:
                seconds, tokens = asyncio.run(_step(recipe, student, server.url, device, n, root))
                fit.points.append((n, seconds, tokens / seconds))
            del student
        finally:
            server.stop()
    if device == "cuda":
        torch.cuda.empty_cache()
    return fit


async def _step(recipe: Path, student: torch.nn.Module, url: str, device: str, new_tokens: int,
                root: Path) -> tuple[float, int]:
    cfg = load_config(recipe, [f"teacher.url={url}", f"student.device={device}", "data.task=arithmetic",
                               "data.path=null", "data.eval_path=null", f"train.max_new_tokens={new_tokens}",
                               "train.progress=false", f"train.out_dir={root / 'run'}"])
    if device != "cuda":
        cfg.train.precision = "fp32"  # bf16 autocast on a CPU measures the CPU's bf16 support, not the trainer
    async with TeacherClient(url, timeout=600) as client:
        run = assemble(cfg, student, build_tokenizer(), client, root / "run")
        await train_step(run)  # warm-up: allocator, captured graphs, the teacher's first batches
        run.step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        record = await train_step(run)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, record["tokens"]

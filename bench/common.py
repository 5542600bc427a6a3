"""Shared pieces of the benchmark scripts: thread limits, machine facts, timers, models, tables.

Why this shape: the machine is small and shared, so absolute numbers drift from minute to minute.
Every script therefore runs the variants it compares in one process, interleaved round by round,
and reports the ratio of medians next to the absolute figures; the targets are on the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TRB_BENCH_CACHE", "/tmp/trb-bench-models"))
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# The larger, compute-bound teacher: ~27M parameters, built on the fly with the task tokenizer so it
# can also serve as a teacher of the tiny student (blending needs one shared vocabulary).
LARGE_TEACHER = dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536, max_positions=2048)


def limit_threads(n: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools of child processes, via env) to `n` threads.

    The teacher server subprocess inherits the environment and also gets `--threads n`, so the
    in-process baselines and the server always compute with the same number of threads. Progress
    bars and advisory warnings of the libraries are silenced so the tables stay readable.
    """
    for name in THREAD_ENV:
        os.environ[name] = str(n)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers

    torch.set_num_threads(n)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, str]:
    """Where and with what a table was measured (printed above every table)."""
    import torch
    import transformers

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "load average at start (1/5/15 min)": load,
        "torch threads": f"{threads} (bench process and teacher server alike)",
        "software": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "commit": _git_commit(),
    }


# ---- timing ------------------------------------------------------------------------------------
@dataclass
class Times:
    """Per-call wall seconds, and CPU seconds of this process plus the watched server processes.

    Wall time is what the targets are about; CPU time is the work done, which other tenants of a
    shared machine barely disturb, so a CPU ratio close to the wall ratio says the wall ratio is
    not just noise.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> tuple[int, ...]:
    """`pid` and its live descendants, from /proc: the teacher server runs its model in a child
    process (teacher_server/worker.py), whose CPU the server's own /proc entry does not count."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tuple(tree)


def cpu_now(pids: tuple[int, ...] = ()) -> float:
    return time.process_time() + sum(process_cpu_seconds(p) for p in pids)


def measure(fn: Callable[[], object], pids: tuple[int, ...] = ()) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU counts this process and `pids`."""
    wall, cpu = time.perf_counter(), cpu_now(pids)
    fn()
    return time.perf_counter() - wall, cpu_now(pids) - cpu


def interleave(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
               pids: tuple[int, ...] = ()) -> dict[str, Times]:
    """Run every variant once per round, in turn, and keep the times after `warmup` rounds.

    Interleaving makes the variants share whatever load the other tenants put on the machine,
    which is what keeps a ratio of medians meaningful on a noisy host.
    """
    times = {name: Times() for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            wall, cpu = measure(fn, pids)
            if r >= warmup:
                times[name].wall.append(wall)
                times[name].cpu.append(cpu)
    return times


def run_sync(loop: asyncio.Runner, coro: Coroutine[Any, Any, T]) -> T:
    """`loop.run(coro)`, except that the main task never holds the (large) result.

    When `asyncio.Runner.run` restores the SIGINT handler, Python 3.11's `signal.getsignal` builds
    an error message with `repr(handler)`, which includes `repr(task)` and so `repr(result)`: for a
    rollout or a list of scores that is a full tensor print, ~20% of a timed call. Boxing the
    result keeps that cost out of every figure.
    """
    box: list[T] = []

    async def boxed() -> None:
        box.append(await coro)

    loop.run(boxed())
    return box[0]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """`median (min-max)` in milliseconds, for the absolute column."""
    return f"{median(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


# ---- models ------------------------------------------------------------------------------------
def _save(model: object, tokenizer: object, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)  # type: ignore[attr-defined]
    tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
    tmp.rename(path)
    return path


def random_model(name: str, shape: dict[str, int], seed: int = 0) -> Path:
    """A randomly initialised Qwen3 with the task tokenizer, saved once under CACHE and reused."""
    from student_trainer.tasks.base_model import ModelShape, build_model
    from student_trainer.tasks.tokenizer import build_tokenizer

    tag = "-".join(f"{k}{v}" for k, v in sorted(shape.items()))
    path = CACHE / f"{name}-{tag}-seed{seed}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer()
        _save(build_model(tokenizer, ModelShape(**shape), seed=seed), tokenizer, path)
    return path


def tiny_model(role: str) -> tuple[Path, str]:
    """(path, provenance) of the shipped `models/arith-<role>`, or a same-shaped random stand-in.

    The shipped models may still be in training; timing depends on the shape, not the weights,
    so a random model of the preset shape measures the same thing until they exist.
    """
    shipped = REPO / "models" / f"arith-{role}"
    if (shipped / "config.json").exists() and any(shipped.glob("*.safetensors")):
        return shipped, f"models/arith-{role}"
    from scripts.train_base_model import PRESETS

    shape = PRESETS[role]
    fields = dict(hidden=shape.hidden, layers=shape.layers, heads=shape.heads, kv_heads=shape.kv_heads,
                  intermediate=shape.intermediate, max_positions=shape.max_positions)
    return random_model(f"arith-{role}", fields, seed=0 if role == "teacher" else 1), \
        f"random stand-in for models/arith-{role} (same shape)"


def large_teacher() -> Path:
    """The compute-bound teacher (Qwen3, hidden 512, 8 layers, ~27M parameters, task vocabulary)."""
    return random_model("large-teacher", LARGE_TEACHER, seed=0)


def load_model(path: Path) -> object:
    """A float32 causal LM in eval mode, as the server's HF backend loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def parameters(path: Path) -> int:
    return sum(p.numel() for p in load_model(path).parameters())  # type: ignore[attr-defined]


@contextlib.contextmanager
def teacher_server(model: Path, threads: int, *extra: str) -> Iterator[object]:
    """A real `trb-teacher serve` subprocess on a free 127.0.0.1 port, stopped on exit."""
    from student_trainer.teacher.local import LocalTeacher

    log = CACHE / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = LocalTeacher(str(model), *extra, threads=threads, log=log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- tables ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of a result table. `ratio` is None for rows that only give context."""

    variant: str
    figure: str
    ratio: float | None = None
    target: str = ""

    @property
    def status(self) -> str:
        if self.ratio is None or not self.target or self.target.startswith("("):
            return ""  # context rows; a parenthesised target is shown for comparison only
        op, bound = self.target.split()
        ok = self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)
        return "PASS" if ok else "MISS"


@dataclass
class Section:
    """The table of one benchmark plus the settings it ran with."""

    title: str
    settings: str
    rows: list[Row] = field(default_factory=list)

    def add(self, variant: str, figure: str, ratio: float | None = None, target: str = "") -> None:
        self.rows.append(Row(variant, figure, ratio, target))

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.settings, "",
                 "| variant | absolute | ratio | target | result |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            ratio = "" if r.ratio is None else f"{r.ratio:.3g}"
            lines.append(f"| {r.variant} | {r.figure} | {ratio} | {r.target} | {r.status} |")
        return "\n".join(lines) + "\n"


def machine_markdown(info: dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n"


def report(sections: list[Section], info: dict[str, str]) -> str:
    """Machine facts (taken when the run started) followed by every section's table."""
    return "\n".join([machine_markdown(info)] + [s.markdown() for s in sections])


def base_parser(description: str) -> object:
    """Arguments every script accepts: thread count and a quick mode for smoke runs."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, bench process and server alike")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, not a measurement)")
    return ap


def build_random(config: Any, device: str, dtype: Any = None) -> Any:
    """A randomly initialised CausalLM of `config` made directly on `device` (seed 0); float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)

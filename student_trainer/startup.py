"""What the trainer does before its first step, and what it says meanwhile.

The usual first-hour mistakes (a model path that is not there, a teacher that is not up, a wrong
API key, two tokenizers) should each end in one line that names the key at fault, and a wait
should never be silent. The run (training/loop.py) and the dry run (`trb-train --check`, dry_run.py)
go through these same steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.model_source import check_model_source
from student_trainer.config import DEFAULT_TEACHER, Config
from student_trainer.methods.plan import uses_sessions

if TYPE_CHECKING:  # torch comes with these: the CLI checks model paths before paying for it
    from shared.protocol import ModelInfo
    from student_trainer.teacher.client import TeacherClient
    from student_trainer.teacher.local import LocalTeacher

Report = Callable[[str], None]


def say(message: str) -> None:
    """A progress line on stderr (stdout stays for what a command is asked to print)."""
    print(f"trb-train: {message}", file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """For ranks other than the first under torchrun: one voice is enough."""


def check_sources(cfg: Config, student: bool = True) -> dict[str, str]:
    """How each model reference will be read ('local', 'cache', 'hub'); ModelSourceError names the bad one."""
    found = {}
    if student:
        found["student.path"] = check_model_source("student.path", cfg.student.path)
    if cfg.teacher.url is None and cfg.teacher.model is not None:
        found["teacher.model"] = check_model_source("teacher.model", cfg.teacher.model)
    return found


def grader_note(cfg: Config, report: Report = say) -> None:
    """Say so when math answers fall back to the string normaliser: accuracy is then a lower bound."""
    from student_trainer.tasks.math_grader import INSTALL_HINT, resolve

    if cfg.data.task == "math" and resolve(cfg.data.grader) == "normalize" and cfg.data.grader == "auto":
        report(f"data.grader: math-verify is not installed, so math answers are graded by the string normaliser "
               f"(it under-credits equivalent forms; {INSTALL_HINT} for symbolic grading)")


def local_teachers(cfg: Config) -> dict[str, str]:
    """{teacher id: model} of the teachers the trainer serves itself (those without a url)."""
    t = cfg.teacher
    models = {DEFAULT_TEACHER: t.model} if t.url is None else {}
    return models | {tid: o.model for tid, o in t.others.items() if o.url is None}


def teacher_urls(cfg: Config, local: dict[str, list[str]]) -> dict[str, list[str]]:
    """{teacher id: replica URLs}: the configured ones, and `local` for the teachers the trainer serves."""
    configured = {DEFAULT_TEACHER: cfg.teacher.urls} | {tid: o.urls for tid, o in cfg.teacher.others.items()}
    return {tid: urls or local[tid] for tid, urls in configured.items()}


def start_local_teacher(cfg: Config, log: Path, report: Report = say, model: str | None = None) -> LocalTeacher:
    """`trb-teacher serve` for `model` (default: teacher.model) on a free loopback port; a failed start is a
    TeacherError."""
    from student_trainer.teacher.client import TeacherError
    from student_trainer.teacher.local import LocalTeacher

    model = model or cfg.teacher.model
    report(f"teacher url is null: starting a teacher server for {model} (log: {log})")
    teacher = LocalTeacher(model, threads=cfg.teacher.threads, log=log)
    try:
        return teacher.wait_ready(cfg.teacher.ready_timeout_s, report=report)
    except (RuntimeError, TimeoutError) as exc:
        teacher.stop()
        raise TeacherError(f"{exc}{_last_line(log)}") from exc


@contextmanager
def serving_local_teachers(cfg: Config, log_of: Callable[[str], Path]) -> Iterator[dict[str, list[str]]]:
    """The teachers the trainer serves itself (one each), started, and stopped on leaving: {teacher id: [url]}
    for `teacher_urls`. `log_of(teacher id)` is where each one's server log goes."""
    started: dict[str, LocalTeacher] = {}
    try:
        for tid, model in local_teachers(cfg).items():
            started[tid] = start_local_teacher(cfg, log_of(tid), model=model)
        yield {tid: [teacher.url] for tid, teacher in started.items()}
    finally:
        for teacher in started.values():
            teacher.stop()


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f"; its last line: {lines[-1].strip()}" if lines else ""


def check_teacher_serves(cfg: Config, info: ModelInfo) -> None:
    """Refuse, before the first step, a method the teacher cannot serve (it would fail at its first rollout)."""
    from student_trainer.teacher.client import TeacherError

    if uses_sessions(cfg) and not info.sessions:
        raise TeacherError(
            f"method.name={cfg.method.name} queries the teacher at every rollout token through a decoding session, "
            f"and this teacher ({info.backend} backend) serves no sessions: serve the teacher with --backend hf or "
            "--backend sglang, or set method.name=opd (or veto), which score finished rollouts")


async def connect(client: TeacherClient, cfg: Config, tokenizer: Any, report: Report = say) -> ModelInfo:
    """Wait for the teacher (saying why while it is not ready), then refuse a tokenizer mismatch and a
    method the teacher cannot serve."""
    await client.wait_ready(cfg.teacher.ready_timeout_s, report=report)
    info = await client.check_tokenizer(tokenizer)
    check_teacher_serves(cfg, info)
    return info


async def open_teachers(stack: AsyncExitStack, cfg: Config, urls: dict[str, list[str]], client_id: str,
                        tokenizer: Any, report: Report = say) -> dict[str, TeacherClient]:
    """{teacher id: client}, each connected (ready, the student's tokenizer, able to serve the method), closed
    with `stack`."""
    from student_trainer.teacher.client import TeacherClient

    teachers = {}
    for tid, replicas in urls.items():
        teachers[tid] = await stack.enter_async_context(TeacherClient.for_run(cfg.teacher, replicas, client_id))
        await connect(teachers[tid], cfg, tokenizer, report=report)
    return teachers

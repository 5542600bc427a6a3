"""The run configuration: pydantic models read from YAML, with `--set key=value` overrides.

Every section forbids unknown keys, so a typo fails before any work with the key's dotted name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from student_trainer.reports.trackers import check_installed
from student_trainer.tasks.math import INSTRUCTION
from student_trainer.tasks.math_grader import INSTALL_HINT, Grader, math_verify_installed

# docs/methods.md
Method = Literal["opd", "trb", "fixed_eps", "skd", "sft_warmup", "teacher_warmup", "veto", "offline_kd"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentCfg(_Section):
    """The model being distilled."""

    path: str = Field(description="Student checkpoint (local path or hub id); its tokenizer must match the teacher's.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Student weights and AdamW states (the "
                                                  "master copy under train.precision=bf16-mixed).")
    device: str = Field("cpu", description="torch device of the student: cpu, cuda (under torchrun: each "
                        "rank's GPU).")
    decoder: Literal["auto", "eager", "static", "qwen3"] = Field(
        "auto", description="Rollout decoder: static = preallocated KV cache, one captured CUDA graph per rollout; "
        "qwen3 = preallocated cache and a hand-written Qwen3 decode step (CPU); eager = transformers' forward "
        "over a growing cache (any model); auto = static on CUDA, qwen3 on a CPU for Qwen3 models, else eager.")
    rollout_device: str | None = Field(None, description="Device of the rollout producer's copy of the student "
                                       "under train.max_staleness >= 1 (cpu, cuda, cuda:N); null: student.device.")

    @field_validator("rollout_device")
    @classmethod
    def _device_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
            raise ValueError(f"{name!r} is not a device: cpu, cuda or cuda:N")
        return name


class OtherTeacher(_Section):
    """One more teacher of a multi-teacher run: a running server, or a model the trainer serves locally."""

    url: str | list[str] | None = Field(None, description="Running teacher server, or a list of replicas.")
    model: str | None = Field(None, description="Teacher model for a local server (when url is null).")

    @model_validator(mode="after")
    def _one_source(self) -> OtherTeacher:
        if self.url is None and self.model is None:
            raise ValueError("set url (a running server) or model (start one locally)")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url or [])


DEFAULT_TEACHER = "default"


class TeacherCfg(_Section):
    """Where teacher logprobs come from: a running `trb-teacher serve`, or one the trainer starts; with
    `others` and `route`, several teachers, each training row scored by its own (docs/multi-teacher.md)."""

    url: str | list[str] | None = Field(None, description="Running teacher server, or a list of replicas "
                                        "(least-loaded routing, sessions pinned); null starts one locally.")
    model: str | None = Field(None, description="Teacher model for the local server (when url is null).")
    top_k: int = Field(20, ge=1, description="Teacher logprobs per position: its top-k tokens (plus the tail mass).")
    api_key: str | None = Field(default_factory=lambda: env_api_key(),
                                description="Key for a teacher that requires one (default: $TRB_API_KEY, else "
                                "the key in the file named by $TRB_API_KEY_FILE).",
                                json_schema_extra={"doc_default": "$TRB_API_KEY", "secret": True})
    timeout_s: float = Field(120.0, gt=0, description="Seconds one teacher request may take before it is retried.")
    retries: int = Field(10, ge=0, description="Retries of a request that cannot connect or gets 503/429, pausing "
                         "0.5 s doubling to 10 s (10: about 35-65 s): how long a run waits for a restarting teacher.")
    retry_for_s: float = Field(300.0, ge=0, description="Keep retrying a request that cannot connect or gets "
                               "503 until this long after its first try, past `retries`: carries a run through a "
                               "teacher restart or an engine restart behind it (SGLang/vLLM: a minute or more).")
    ready_timeout_s: float = Field(300.0, gt=0, description="Seconds to wait at start for the teacher to load; "
                                   "what is awaited is printed every ~10 s.")
    threads: int | None = Field(None, description="torch threads of the local teacher server.")
    stream_chunk_tokens: int = Field(16, ge=0, description="Student-only rollouts (opd, trb at eps 0) get their "
                                     "targets through a session, this many tokens at a time while sampling goes on, "
                                     "so the step waits only for the last chunk's scoring; 0 (or max_new_tokens "
                                     "at most this): one /v1/score call after sampling.")

    others: dict[str, OtherTeacher] = Field(default_factory=dict, description="More teachers by id (multi-"
                                            "teacher distillation), each {url: ...} or {model: ...}; they share "
                                            "top_k, api_key and the timeouts, and the student's tokenizer.")
    route: dict[str, str] = Field(default_factory=dict, description="Which teacher scores a training row: the "
                                  "first key that its prompt contains names the teacher id (e.g. {'*': mul}); "
                                  "other rows go to the teacher above (id `default`).")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherCfg:
        if self.url is None and self.model is None:
            raise ValueError("teacher: set teacher.url (a running server) or teacher.model (start one locally)")
        if self.url == []:
            raise ValueError("teacher.url: an empty list; give one URL or several replicas")
        if DEFAULT_TEACHER in self.others:
            raise ValueError(f"teacher.others: `{DEFAULT_TEACHER}` is the id of the teacher set by teacher.url/model")
        known = {DEFAULT_TEACHER, *self.others}
        for key, teacher in self.route.items():
            if teacher not in known:
                raise ValueError(f"teacher.route: {key!r} names teacher {teacher!r}; known ids: {sorted(known)}")
        return self

    def teacher_of(self, prompt: str) -> str:
        """The id of the teacher that scores a training row with this prompt."""
        return next((t for key, t in self.route.items() if key in prompt), DEFAULT_TEACHER)

    @property
    def urls(self) -> list[str]:
        """The configured replicas (empty when the trainer starts a local teacher)."""
        return [self.url] if isinstance(self.url, str) else list(self.url or [])


class MethodCfg(_Section):
    """The distillation method: who picks the rollout tokens, and the loss (methods/plan.py; docs/methods.md)."""

    name: Method = Field("trb", description="Who picks rollout tokens; `trb-train --help` lists the methods.")
    eps0: float = Field(0.1, ge=0, description="Initial KL budget (nats per token) for trb / fixed_eps.")
    horizon: int = Field(100, ge=0, description="Warmup length K in optimizer steps (trb anneal, sft_warmup, "
                                                "teacher_warmup).")
    schedule: Literal["linear", "cosine"] = Field("linear", description="Anneal shape of the trb budget.")
    skd_top_k: int = Field(5, ge=1, description="SKD keeps a student token inside the teacher's top-K.")
    sft_loss: Literal["cross_entropy", "forward_kl"] = Field(
        "cross_entropy", description="sft_warmup's loss on teacher rollouts: NLL of the teacher's tokens, or "
                                     "forward KL(π_T‖π_S) to its top-k + tail.")
    veto_beta: float = Field(0.8, ge=0, description="Veto's β at step 0 (target ∝ π_T·π_S^β); 0.8 is the "
                                                    "authors' GSM8K value.")
    veto_divergence: Literal["forward", "reverse"] = Field(
        "forward", description="Veto's loss: forward KL(q_β‖π_S) (the paper's main form) or reverse KL(π_S‖q_β).")
    veto_schedule: Literal["linear", "constant"] = Field(
        "linear", description="Veto's β: linear decay to 0 over train.steps (the authors'), or constant.")
    offline_loss: Literal["reverse_kl", "forward_kl"] = Field(
        "reverse_kl", description="offline_kd's loss on the stored completions: reverse KL(π_S‖π̂_T) or forward "
                                  "KL(π̂_T‖π_S), both to the stored top-k + tail.")


class DataCfg(_Section):
    """Training prompts, held-out eval problems and the KL probe set."""

    task: Literal["arithmetic", "math"] = Field("arithmetic", description="arithmetic: generated problems; "
                                                "math: problems from data.path.")
    seed: int = Field(0, description="Seed of the training prompts: their order (math) or draw (arithmetic).")
    eval_seed: int | None = Field(None, description="Seed of the held-out eval set and the KL probe, apart from "
                                  "the training prompts' (a fixed benchmark across seeds and methods); "
                                  "null: data.seed.")
    difficulty: dict[str, Any] = Field(default_factory=dict, description="Task generator knobs (arithmetic).")
    eval_size: int = Field(200, ge=1, description="Held-out problems for greedy pass@1 accuracy.")
    probe_size: int = Field(32, ge=1, description="Fixed prompts+solutions for the KL probe.")
    eval_batch_size: int = Field(256, ge=1, description="Prompts per greedy generate call in eval.")
    path: str | None = Field(None, description="math: training problems (.jsonl, .json or .parquet).")
    eval_path: str | None = Field(None, description="math: held-out problems; null holds out eval_size of path.")
    instruction: str = Field(INSTRUCTION, description="math: appended to every question.")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict,
                                                 description="math: e.g. {enable_thinking: false} for Qwen3.")
    offline_path: str | None = Field(None, description="offline_kd: a `trb-train export` folder (stored "
                                     "completions and teacher top-k; docs/offline.md).")
    grader: Grader = Field("auto", description="math: answer equality by math-verify (symbolic; the math extra) or "
                           "the string normaliser; auto: math-verify when installed (docs/math.md).")

    @field_validator("grader")
    @classmethod
    def _grader_installed(cls, grader: Grader) -> Grader:
        if grader == "math_verify" and not math_verify_installed():
            raise ValueError(f"math-verify is not installed; {INSTALL_HINT}, or use auto / normalize")
        return grader

    @model_validator(mode="after")
    def _math_needs_a_file(self) -> DataCfg:
        if self.task == "math" and self.path is None:
            raise ValueError("data.path: data.task=math needs a problem file (.jsonl, .json or .parquet)")
        return self


class OptimCfg(_Section):
    """AdamW and its learning-rate schedule."""

    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (peak, after warmup).")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup in optimizer steps.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="Learning rate after warmup.")
    accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step and rank (batch_size must "
                                                  "divide by world size x accum_steps); the loss is unchanged.")


class TrainCfg(_Section):
    """Steps, batch, rollout length, eval, checkpoints."""

    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Prompts per optimizer step over all ranks (one rollout each).")
    max_new_tokens: int = Field(64, ge=1, description="Longest rollout response (and eval completion) in tokens.")
    seed: int = Field(0, description="Seed of the rollout sampling streams (one per step and row).")
    eval_every: int = Field(25, ge=0, description="0 disables periodic eval (eval still runs at start and end).")
    save_every: int = Field(50, ge=0, description="0 saves only at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept in out_dir/checkpoints.")
    out_dir: str = Field("runs/trb", description="Run folder: config.yaml, metrics.jsonl, checkpoints/.")
    threads: int | None = Field(None, description="torch threads of the trainer.")
    progress: bool = Field(True, description="Live progress bar on stderr (false for logs; metrics.jsonl is "
                           "always written).")
    max_bad_steps: int = Field(3, ge=1, description="Consecutive non-finite steps before the run stops.")
    rollout_batch_size: int | None = Field(None, ge=1, description="Rows one decode loop rolls out (one teacher "
                                           "session); None: the rank's whole slice. A multiple of the backward "
                                           "micro-batch (batch_size / world / accum_steps).")
    precision: Literal["fp32", "bf16-mixed"] = Field("fp32", description="bf16-mixed: bf16 forward/backward and "
                                                     "rollouts, float32 master weights and AdamW states "
                                                     "(needs student.dtype=float32).")
    loss_chunk_tokens: int | None = Field(None, ge=0, description="Tokens per lm_head + loss chunk (recomputed in "
                                          "the backward); None: ~2^25 logits a chunk; 0: full logits at once.")
    max_staleness: int = Field(0, ge=0, le=2, description="Optimizer steps the rollouts may run ahead of the "
                               "learner (docs/async.md): batch k is sampled by the policy of step k - "
                               "max_staleness; 0: rollout then update, one after the other.")
    producer: Literal["thread", "process"] = Field("thread", description="The rollout producer under "
                                                   "max_staleness >= 1: an asyncio task of the trainer, or a "
                                                   "process of its own reading the weights from shared memory "
                                                   "(docs/async.md).")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: DDP replicates the student, "
                                             "FSDP2 shards it (GPU-sized students); unused in one process.")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] | None = Field(
        None, description="Trackers that also get metrics.jsonl's scalars, the config and training.png, each an "
                          "extra (pip install 'trb-distill[wandb]'); null: tensorboard when installed; [] none.")
    tracker_project: str = Field("trb-distill", description="Project (W&B, trackio) or experiment (MLflow) name; "
                                 "the run is named after out_dir.")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str] | None) -> list[str] | None:
        check_installed(names or [])  # at config time, not at the first log call
        return names


class Config(_Section):
    """A whole run. `public()` is what gets written to run folders: everything but secrets."""

    student: StudentCfg
    teacher: TeacherCfg
    method: MethodCfg = MethodCfg()
    data: DataCfg = DataCfg()
    optim: OptimCfg = OptimCfg()
    train: TrainCfg = TrainCfg()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.train.batch_size % self.optim.accum_steps:
            raise ValueError(f"optim.accum_steps: {self.optim.accum_steps} does not divide "
                             f"train.batch_size={self.train.batch_size}")
        if self.train.precision == "bf16-mixed" and self.student.dtype != "float32":
            raise ValueError("train.precision: bf16-mixed keeps float32 master weights; set student.dtype=float32 "
                             "(student.dtype=bfloat16 with precision=fp32 trains in pure bf16)")
        if self.method.name == "offline_kd" and self.data.offline_path is None:
            raise ValueError("data.offline_path: method.name=offline_kd trains on a `trb-train export` folder")
        if not self.train.max_staleness:
            if self.train.producer == "process":
                raise ValueError("train.producer: a producer process needs train.max_staleness >= 1 (at 0 the "
                                 "learner rolls out itself)")
            if self.student.rollout_device is not None:
                raise ValueError("student.rollout_device: the producer's device needs train.max_staleness >= 1 (at "
                                 "0 the learner rolls out on student.device)")
        if self.method.name == "skd" and self.method.skd_top_k > self.teacher.top_k:
            raise ValueError(f"method.skd_top_k: {self.method.skd_top_k} exceeds teacher.top_k={self.teacher.top_k}")
        return self

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"teacher": {"api_key"}})


class ConfigError(ValueError):
    """A bad config, with the dotted key at fault in the message."""


def env_api_key() -> str | None:
    """The teacher key from $TRB_API_KEY or, when that is unset, from the file $TRB_API_KEY_FILE names
    (docker compose: the key the teacher minted into a volume only it and the trainers mount)."""
    key = os.environ.get("TRB_API_KEY", "").strip()
    path = os.environ.get("TRB_API_KEY_FILE", "").strip()
    if key or not path:
        return key or None
    try:
        key = Path(path).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"TRB_API_KEY_FILE={path} does not exist: the teacher writes it at its first start "
                          "(start the teacher first, e.g. docker compose up -d teacher), or set TRB_API_KEY") from None
    except OSError as exc:
        raise ConfigError(f"cannot read TRB_API_KEY_FILE={path}: {exc}") from exc
    if not key:
        raise ConfigError(f"TRB_API_KEY_FILE={path} is empty")
    return key


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> Config:
    """YAML file, then `key.sub=value` overrides (values parsed as YAML), validated once."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=10")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("bad config:\n" + "\n".join(lines)) from exc

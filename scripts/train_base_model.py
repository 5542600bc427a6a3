"""Train a tiny Qwen3 model from scratch on the arithmetic task with SFT, evaluate it, save it.

This is the script that made models/arith-teacher and models/arith-student; each model card holds
the exact command. Run from the repository root:

    python -m scripts.train_base_model --preset teacher --steps 4000 --out models/arith-teacher

The output folder gets config + safetensors weights (float32), tokenizer files, `task.json` (the
task difficulty and the evaluation sample, so `scripts.eval_model` measures the same thing) and a
generated README.md model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from student_trainer.tasks import arithmetic
from student_trainer.tasks.base_model import ModelShape, SFTConfig, build_model, count_parameters, evaluate, train
from student_trainer.tasks.tokenizer import build_tokenizer, save_tokenizer

PRESETS = {
    "teacher": ModelShape(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=384, rope_theta=500.0),
    "student": ModelShape(hidden=96, layers=3, heads=3, kv_heads=3, intermediate=256, rope_theta=500.0),
}
DATA_SEED_OFFSET = 1000  # training problems use seed + this, so they never reuse the eval seed's stream


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="teacher")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-smoothing", type=float, default=0.0,
                    help="uniform mass mixed into the SFT target: an under-confident model whose samples stray")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--eval-seed", type=int, default=0)
    for field in dataclasses.fields(arithmetic.Difficulty):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return ap.parse_args()


def difficulty_from(args: argparse.Namespace) -> dict:
    """The task difficulty keywords given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(arithmetic.Difficulty)}


def machine() -> str:
    """A one-line description of where this ran (for the model card)."""
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch threads={torch.get_num_threads()}"


def model_card(name: str, info: dict) -> str:
    """The README.md written next to the weights: size, accuracy, how it was made."""
    shape = ", ".join(f"{k}={v}" for k, v in info["shape"].items())
    accs = "\n".join(f"| {n} | {a:.3f} |" for n, a in info["accuracy"].items())
    return f"""# {name}

A tiny Qwen3 causal LM trained from scratch by supervised fine-tuning on the built-in arithmetic
task (`student_trainer/tasks/arithmetic.py`), character-level tokenizer
(`student_trainer/tasks/tokenizer.py`). Float32 safetensors.

- Parameters: {info["parameters"]:,} ({shape})
- Task difficulty: `{json.dumps(info["difficulty"])}`
- Training: {info["steps"]} steps x batch {info["batch_size"]}, lr {info["lr"]}, seed {info["seed"]}, label smoothing {info.get("label_smoothing", 0.0)}
- Training time: {info["train_seconds"]:.0f} s wall, {info["train_cpu_seconds"]:.0f} s CPU, on {info["machine"]}

## Greedy pass@1 (test split, seed {info["eval_seed"]}, first n problems)

| n | accuracy |
| --- | --- |
{accs}

Measure it again with:

    python -m scripts.eval_model {info["out"]} --n {info["eval_n"]} --seed {info["eval_seed"]}

## Command that made it (from the repository root)

    {info["command"]}
"""


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    difficulty = difficulty_from(args)
    tokenizer = build_tokenizer()
    shape = PRESETS[args.preset]
    model = build_model(tokenizer, shape, seed=args.seed)
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
                    label_smoothing=args.label_smoothing)
    n_params = count_parameters(model)
    print(f"{args.preset}: {n_params:,} parameters, difficulty {difficulty}")
    n_train = cfg.steps * cfg.batch_size
    problems = arithmetic.generate(n_train, args.seed + DATA_SEED_OFFSET, "train", distinct=False, **difficulty)

    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, tokenizer, problems, cfg)
    train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    test = arithmetic.generate(args.eval_n, args.eval_seed, "test", **difficulty)
    max_new = max(len(p.solution) for p in test) + 16
    sizes = sorted({min(200, args.eval_n), args.eval_n})
    accuracy = {n: evaluate(model, tokenizer, test[:n], max_new_tokens=max_new)[0] for n in sizes}
    print(f"trained in {train_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU; greedy accuracy {accuracy}")

    info = {
        "parameters": n_params,
        "shape": dataclasses.asdict(shape),
        "difficulty": difficulty,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "label_smoothing": cfg.label_smoothing,
        "train_seconds": train_seconds,
        "train_cpu_seconds": cpu_seconds,
        "machine": machine(),
        "eval_seed": args.eval_seed,
        "eval_n": args.eval_n,
        "accuracy": {str(n): a for n, a in accuracy.items()},
        "command": "python -m scripts.train_base_model " + shlex.join(sys.argv[1:]),
        "out": str(args.out),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tokenizer, args.out)
    (args.out / "task.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(args.out.name, info))


if __name__ == "__main__":
    main()

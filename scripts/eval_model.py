"""Greedy pass@1 of a saved model on the arithmetic test split.

    python -m scripts.eval_model models/arith-teacher --n 1000 --seed 0

The task difficulty is read from the model folder's `task.json` (written by
`scripts.train_base_model`), so the test problems match what the model was trained on; pass
difficulty flags to override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.tasks import arithmetic
from student_trainer.tasks.base_model import evaluate


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show", type=int, default=5, help="print this many failures")
    for field in dataclasses.fields(arithmetic.Difficulty):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    return ap.parse_args()


def load_difficulty(model_dir: Path, args: argparse.Namespace) -> dict:
    """Difficulty from task.json, with any command-line flag taking precedence."""
    task_file = model_dir / "task.json"
    difficulty = json.loads(task_file.read_text())["difficulty"] if task_file.exists() else {}
    for field in dataclasses.fields(arithmetic.Difficulty):
        if getattr(args, field.name) is not None:
            difficulty[field.name] = getattr(args, field.name)
    return difficulty


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    difficulty = load_difficulty(args.model, args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    problems = arithmetic.generate(args.n, args.seed, args.split, **difficulty)
    max_new = max(len(p.solution) for p in problems) + 16

    start = time.perf_counter()
    accuracy, completions = evaluate(model, tokenizer, problems, max_new_tokens=max_new, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    failures = [(p, c) for p, c in zip(problems, completions, strict=True) if not arithmetic.verify(c, p)]
    for p, c in failures[: args.show]:
        print(f"FAIL {p.prompt.strip()!r}: got {c!r}, want {p.solution!r}")
    print(f"difficulty {difficulty}")
    n_ok = len(problems) - len(failures)
    print(f"accuracy {accuracy:.4f} ({n_ok}/{len(problems)}, {args.split} seed {args.seed}) in {seconds:.1f} s")


if __name__ == "__main__":
    main()

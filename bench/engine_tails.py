"""What the teacher's tail does to the training signal, per backend: the same student, the same text.

For each teacher URL (the first is the reference, normally `--backend hf`), two numbers:
- probe KL: KL(π_S || π_T) on the probe set's reference solutions (the run's "probe KL" at step 0);
- rollout KL: the token-mean reverse KL on a fixed batch of the student's own samples (OPD's step-1
  loss on identical rollouts).
and for each, the ratio to the reference's, plus how the tails differ (the largest |Δ log tail| and the
share of positions where they differ by more than 1 nat). The student samples once, with a fixed seed,
so every teacher scores the same tokens.

    python -m bench.engine_tails --teacher hf=http://127.0.0.1:8000 --teacher sglang=http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from student_trainer.config import DataCfg
from student_trainer.data import TaskData
from student_trainer.tasks.arithmetic import Problem
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.evaluation import Probe, build_probe, probe_kl


def student_rollouts(student: torch.nn.Module, tokenizer, problems: list[Problem], max_new_tokens: int,
                     seed: int) -> list[Problem]:
    """The problems with the student's sampled completion (temperature 1) in place of the reference."""
    torch.manual_seed(seed)
    out = []
    for p in problems:
        ids = tokenizer(p.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        gen = student.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in gen:
            gen = gen[: gen.index(tokenizer.eos_token_id)]
        out.append(dataclasses.replace(p, solution=tokenizer.decode(gen)))
    return out


def tail_gap(a: Probe, b: Probe) -> tuple[float, float]:
    """Largest |Δ log tail| over loss positions, and the share of them that differ by more than 1 nat."""
    mask = a.mask_B_T
    gap = (a.targets.tail_logprob - b.targets.tail_logprob).abs()[mask]
    return float(gap.max()), float((gap > 1.0).float().mean())


async def measure(urls: list[tuple[str, str]], student_path: str, top_k: int, rollouts: int,
                  max_new_tokens: int, seed: int) -> list[dict]:
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    data = TaskData(DataCfg(task="arithmetic", seed=0, eval_size=200, probe_size=32), tokenizer)
    with torch.no_grad():
        samples = student_rollouts(student, tokenizer, data.train_batch(0, rollouts), max_new_tokens, seed)
    rows, ref = [], None
    for name, url in urls:
        async with TeacherClient(url, client_id="bench:engine_tails") as client:
            info = await client.wait_ready(600)
            probe = await build_probe(data.probe_set(), tokenizer, client, top_k)
            rolled = await build_probe(samples, tokenizer, client, top_k)
        row = {"name": name, "backend": info.backend, "dtype": info.dtype, "tail": info.tail,
               "probe_kl": probe_kl(student, probe), "rollout_kl": probe_kl(student, rolled), "rolled": rolled}
        ref = ref or row
        row["probe_ratio"] = row["probe_kl"] / ref["probe_kl"]
        row["rollout_ratio"] = row["rollout_kl"] / ref["rollout_kl"]
        row["tail_gap"], row["tail_off"] = tail_gap(rolled, ref["rolled"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", action="append", required=True, help="name=URL; the first is the reference")
    parser.add_argument("--student", default="models/arith-student")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--rollouts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    urls = [tuple(t.split("=", 1)) for t in args.teacher]
    rows = asyncio.run(measure(urls, args.student, args.top_k, args.rollouts, args.max_new_tokens, args.seed))
    print(f"{'teacher':<16} {'backend':<8} {'dtype':<9} {'tail':<8} {'probe KL':>9} {'/ ref':>7} "
          f"{'rollout KL':>11} {'/ ref':>7} {'max|Δ log tail|':>16} {'>1 nat':>7}")
    for r in rows:
        print(f"{r['name']:<16} {r['backend']:<8} {r['dtype']:<9} {r['tail']:<8} {r['probe_kl']:>9.4f} "
              f"{r['probe_ratio']:>7.4f} {r['rollout_kl']:>11.4f} {r['rollout_ratio']:>7.4f} "
              f"{r['tail_gap']:>16.3g} {r['tail_off']:>7.1%}")


if __name__ == "__main__":
    main()

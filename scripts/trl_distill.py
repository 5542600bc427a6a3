"""A short TRL distillation run whose teacher is our server, reached as if it were a vLLM server.

TRL's `ServerDistillationTrainer` (trl 1.16, unchanged) distils models/arith-student from
models/arith-teacher served by `trb-teacher serve` (hf backend, API keys on): every teacher call is
TRL's `VLLMClient.get_sequence_logprobs`, a `POST /v1/completions` with `prompt_logprobs`, answered by
our vLLM-compatible route. The key travels the only way TRL's client can send one, in the URL
(`http://trl:<key>@127.0.0.1:<port>`, HTTP Basic). On a CPU: the student generates with transformers
(`use_vllm` off), so no vLLM is needed anywhere; VLLMClient's import gate on the vllm package is the one
thing answered here (it guards nothing the HTTP calls use).

    .venv/bin/python scripts/trl_distill.py --steps 60 --out runs/trl-distill

Prints the training loss by step and the student's greedy accuracy before and after (docs/interop.md).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(REPO / "models/arith-teacher"))
    parser.add_argument("--student", default=str(REPO / "models/arith-student"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)  # the demo recipe's rate
    parser.add_argument("--beta", type=float, default=0.0, help="TRL's beta: 0 forward KL on the teacher's "
                        "top-k, 1 reverse KL on the sampled token (loss_top_k 1).")
    parser.add_argument("--top-k", type=int, default=8, help="TRL's loss_top_k (the teacher's prompt_logprobs).")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--out", default=str(REPO / "runs/trl-distill"))
    return parser.parse_args()


def probe(model: object, tokenizer: object, n: int) -> tuple[float, float]:
    """(greedy accuracy, mean NLL per token of the reference solutions) on `n` held-out problems.

    Why both: accuracy on a few hundred problems moves by a few points between evaluations, while the
    NLL of the worked solutions (which the teacher writes at 98.6% accuracy) is a steady measure of
    how far the student moved toward the teacher.
    """
    import torch

    from student_trainer.tasks.arithmetic import generate
    from student_trainer.tasks.base_model import evaluate

    problems = generate(n, seed=0, split="test")
    total, count = 0.0, 0
    with torch.no_grad():
        for p in problems:
            prompt = tokenizer.encode(p.prompt, add_special_tokens=False)
            ids = prompt + tokenizer.encode(p.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
            lp_T_V = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            targets = torch.tensor(ids[1:])
            nll = -lp_T_V[torch.arange(len(ids) - 1), targets][len(prompt) - 1:]
            total, count = total + float(nll.sum()), count + len(nll)
    return evaluate(model, tokenizer, problems)[0], total / count


def main() -> None:
    args = parse()
    import torch
    import trl.generation.vllm_client as vllm_client
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    from student_trainer.tasks.arithmetic import generate
    from student_trainer.teacher.local import LocalTeacher

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(16)
    (keys := out / "teacher.keys").write_text(f"trl:{key}\n")
    keys.chmod(0o600)
    teacher = LocalTeacher(args.teacher, "--api-keys-file", str(keys), threads=1, log=out / "teacher.log")
    try:
        teacher.wait_ready()
        url = f"http://trl:{key}@127.0.0.1:{teacher.port}"
        vllm_client.is_vllm_available = lambda *a, **k: True  # the import gate only (module docstring)
        tokenizer = AutoTokenizer.from_pretrained(args.student)
        model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
        before = probe(model, tokenizer, args.eval_problems)
        prompts = [p.prompt for p in generate(args.steps * args.batch, seed=1, split="train", distinct=False)]
        config = ServerDistillationConfig(
            output_dir=str(out), teacher_model_server_url=url, beta=args.beta, loss_top_k=args.top_k,
            max_completion_length=48, per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=args.lr, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            temperature=1.0)
        trainer = ServerDistillationTrainer(model=model, args=config, processing_class=tokenizer,
                                            train_dataset=Dataset.from_dict({"prompt": prompts}))
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        after = probe(trainer.model, tokenizer, args.eval_problems)
    finally:
        teacher.stop()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    summary = {"steps": args.steps, "batch": args.batch, "beta": args.beta, "loss_top_k": args.top_k,
               "lr": args.lr, "train_seconds": round(seconds, 1), "loss_by_step": losses,
               "accuracy_before": before[0], "accuracy_after": after[0], "solution_nll_before": round(before[1], 4),
               "solution_nll_after": round(after[1], 4), "eval_problems": args.eval_problems,
               "command": " ".join(sys.argv)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""A prototype of the OPD step speed-ups of docs/performance.md (finding 5) that the trainer lacks.

    .venv/bin/python -m bench.prototype_fast_opd_step [--blocks 3]

The shipped step now decodes with the hand-written Qwen3 step (`decoders/qwen3_decode.py`, item 1 of
the finding, which this prototype first measured). On top of it, measured against the shipped
`train_step` and TRL's `DistillationTrainer` step in one interleaved run (same harness as
`bench_step_vs_trl`):

2. each row's Gumbel noise drawn once per rollout, `torch.rand((T, V))` from its own generator, which
   gives the numbers the per-step `RowGenerators.rand` draws (checked here), for a policy that draws
   V uniforms per step (OPD);
3. the `/v1/score` request sent before the student's loss forward and awaited after it.

The prototype step skips the OPD diagnostics (all constant or NaN for OPD) and assumes no EOS, as the
bench does. It exists to measure the gain before `student_trainer/` takes it up.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable

import torch

from bench.bench_step_vs_trl import _prompts, opd_block, opd_run, trl_block
from bench.common import (
    Times,
    base_parser,
    cpu_now,
    limit_threads,
    load_model,
    median,
    process_tree,
    run_sync,
    teacher_server,
    tiny_model,
)
from decoders.kv_decode import position_ids
from decoders.qwen3_decode import Qwen3Decoder
from student_trainer.methods.behaviors import make_behavior
from student_trainer.methods.losses import reverse_kl_loss
from student_trainer.methods.row_generators import RowGenerators
from student_trainer.rollouts.batch import _rollout
from student_trainer.rollouts.rollout import Rollout, left_pad
from student_trainer.rollouts.targets import score_targets
from student_trainer.teacher.client import TeacherClient
from student_trainer.training.run import Run


async def fast_step(run: Run, overlap: bool = True) -> torch.Tensor:
    """One OPD optimizer step with the two changes; returns the sampled tokens (B, T)."""
    cfg, tok = run.cfg, run.tokenizer
    batch, new = cfg.train.batch_size, cfg.train.max_new_tokens
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in run.data.train_batch(run.step, batch)]
    streams = RowGenerators.seeded(cfg.train.seed, run.step, range(batch))
    run.policy.eval()
    rows = list(range(batch))
    decoder = Qwen3Decoder(run.policy, tok.pad_token_id, max(map(len, prompts)) + new)
    logits_B_V = decoder.prefill(prompts)
    noise_B_T_V = torch.stack([torch.rand((new, logits_B_V.shape[-1]), generator=g) for g in streams.generators])
    gumbel_B_T_V = -torch.log(-torch.log(noise_B_T_V.clamp_min(torch.finfo(torch.float32).tiny)))
    tokens_B_T = torch.empty((batch, new), dtype=torch.long)
    for t in range(new):
        tokens_B_T[:, t] = (logits_B_V.float().log_softmax(-1) + gumbel_B_T_V[:, t]).argmax(-1)
        if t < new - 1:
            logits_B_V = decoder.extend(rows, [[x] for x in tokens_B_T[:, t].tolist()])
    ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    p = ids.shape[1]
    seq, attention = torch.cat([ids, tokens_B_T], 1), torch.cat([prompt_mask, torch.ones_like(tokens_B_T)], 1)
    loss_mask = torch.zeros_like(seq, dtype=torch.bool)
    loss_mask[:, p - 1 : p - 1 + new] = True
    rollout = Rollout(seq, attention, loss_mask, p, torch.full((batch,), new))
    scored = asyncio.ensure_future(score_targets(rollout, run.teacher, cfg.teacher.top_k, tok.pad_token_id))
    if overlap:
        for _ in range(8):  # let httpx put the request on the wire (as rollout._send)
            await asyncio.sleep(0)
    else:
        await asyncio.wait([scored])
    run.optimizer.zero_grad(set_to_none=True)
    run.lm.train()
    logits = run.lm(input_ids=seq, attention_mask=attention, position_ids=position_ids(attention)).logits
    loss = reverse_kl_loss(logits, await scored, loss_mask, batch * new)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    return tokens_B_T


def check_noise(rows: int = 32, steps: int = 96, vocab: int = 79) -> str:
    per_step = RowGenerators.seeded(0, 3, range(rows))
    started = time.process_time()
    drawn = torch.stack([per_step.rand((rows, vocab), torch.device("cpu")) for _ in range(steps)], 1)
    t_step = time.process_time() - started
    once = RowGenerators.seeded(0, 3, range(rows))
    started = time.process_time()
    bulk = torch.stack([torch.rand((steps, vocab), generator=g) for g in once.generators])
    t_bulk = time.process_time() - started
    return (f"noise: one (T, V) draw per row equals {steps} per-step draws: {torch.equal(drawn, bulk)}; CPU "
            f"{t_step * 1e3:.1f} ms per step-wise rollout vs {t_bulk * 1e3:.1f} ms")


def cpu_seconds(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    limit_threads(1)
    batch, max_new, steps = 32, 96, 4
    student, teacher = tiny_model("student")[0], tiny_model("teacher")[0]
    prompts = _prompts(batch * (steps + 1))
    print(check_noise())
    teacher_model, res = load_model(teacher), {k: Times() for k in ("shipped", "prototype", "no overlap", "trl")}
    with teacher_server(teacher, 1) as server, asyncio.Runner() as loop:
        client, pids = TeacherClient(server.url), process_tree(server.proc.pid)
        shipped, proto = (opd_run(student, client, server.url, batch, max_new, 1) for _ in range(2))
        first = run_sync(loop, fast_step(proto))  # step 0 of both from the same weights; also a warm-up
        print(f"prototype step-0 tokens equal the shipped rollout's: {_same_tokens(shipped, first, loop):.4f}")
        opd_block(shipped, loop, 1, server.proc.pid)  # warm-up

        def timed(name: str, fn: Callable[[], object]) -> None:
            for _ in range(steps):
                wall, cpu = time.perf_counter(), cpu_now(pids)
                fn()
                res[name].wall.append(time.perf_counter() - wall)
                res[name].cpu.append(cpu_now(pids) - cpu)

        for _ in range(args.blocks):
            block = opd_block(shipped, loop, steps, server.proc.pid)
            res["shipped"].wall += block.wall
            res["shipped"].cpu += block.cpu
            timed("prototype", lambda: run_sync(loop, fast_step(proto)))
            timed("no overlap", lambda: run_sync(loop, fast_step(proto, overlap=False)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                block = trl_block(student, teacher_model, prompts, batch, max_new, steps)
            res["trl"].wall += block.wall
            res["trl"].cpu += block.cpu
        run_sync(loop, client.aclose())
    trl = res["trl"]
    print(f"\n{args.blocks} interleaved blocks of {steps} steps; batch {batch} x {max_new} tokens\n")
    print("| variant | wall ms (min-max) | CPU ms | wall / TRL | CPU / TRL |\n| --- | --- | --- | --- | --- |")
    for name, t in res.items():
        print(f"| {name} | {median(t.wall) * 1e3:.0f} ({min(t.wall) * 1e3:.0f}-{max(t.wall) * 1e3:.0f}) | "
              f"{median(t.cpu) * 1e3:.0f} | {median(t.wall) / median(trl.wall):.3f} | "
              f"{median(t.cpu) / median(trl.cpu):.3f} |")


def _same_tokens(shipped: Run, tokens_B_T: torch.Tensor, loop: asyncio.Runner) -> float:
    """Share of the prototype's step-0 tokens equal to a shipped rollout of step 0 (same weights)."""
    rows = range(len(tokens_B_T))
    ro = run_sync(loop, _rollout(shipped, shipped.data.train_batch(0, len(rows)), rows, make_behavior("opd"),
                                 0.0, 0, shipped.policy))
    return (ro.tokens_B_T[:, ro.prompt_width :] == tokens_B_T).float().mean().item()


if __name__ == "__main__":
    main()

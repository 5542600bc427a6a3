"""Decode step time of the eager KV decoder vs the static decoder, without and with a CUDA graph,
and (on a CPU) vs the hand-written Qwen3 step (`decoders/qwen3_decode.py`).

    python -m bench.bench_decode --quick            # CPU: tiny shapes, eager vs static vs qwen3
    python -m bench.bench_decode                    # CUDA: Qwen3-0.6B/1.7B shapes (random weights), bf16

Two patterns, each step followed by the one host sync the real loop has:
- `student` (the rollout): every row gets one token, its greedy next token goes to the host.
- `teacher` (an hf session extend): every row gets one token, the float32 top-k + tail of its logits
  goes to the host (`HFBackend._top`, what the server answers).
Each figure is the median over `--rounds` rounds, the variants interleaved within a round; a round
times `--steps` steps with CUDA events (wall clock on a CPU) after `--warmup` steps (which include
the graph capture). Also checks, in float32, that the variants' logits equal the eager decoder's.
`decode_ms` is the function a GPU script imports.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

from decoders.kv_decode import KVDecoder
from decoders.qwen3_decode import Qwen3Decoder
from decoders.static_decode import StaticKVDecoder
from teacher_server.backends.hf import HFBackend

# Published configs (huggingface.co/Qwen/Qwen3-*/config.json); random weights, no download.
_QWEN3 = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=40960)
SHAPES: dict[str, dict] = {
    "0.6B": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=3072,
                 tie_word_embeddings=True),
    "1.7B": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, intermediate_size=6144,
                 tie_word_embeddings=True),
    "4B": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, intermediate_size=9728,
               tie_word_embeddings=True),
    "8B": dict(_QWEN3, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, intermediate_size=12288,
               tie_word_embeddings=False),
    # --quick: the same code on a CPU in seconds
    "quick": dict(vocab_size=512, head_dim=16, num_key_value_heads=2, rope_theta=1e6, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, tie_word_embeddings=True),
}
KINDS = ("eager", "static", "graph")
TOP_K = 20


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight Qwen3 of a published shape, built directly on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPES[shape]))
    return model.eval()  # no .to(dtype): the rotary table stays float32, as from_pretrained leaves it


def new_decoder(model: torch.nn.Module, kind: str, capacity: int) -> KVDecoder | StaticKVDecoder:
    """`kind`: eager, static, graph (static with a captured step) or qwen3 (CPU)."""
    if kind == "eager":
        return KVDecoder(model)
    if kind == "qwen3":
        return Qwen3Decoder(model, capacity=capacity)
    return StaticKVDecoder(model, capacity=capacity, capture=kind == "graph")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_ms(model: torch.nn.Module, rows: int, steps: int, kind: str, prompt_len: int = 128,
              warmup: int = 3, pattern: str = "student") -> float:
    """Milliseconds per token step of `rows` rows after a `prompt_len` prefill (see the module doc)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(vocab, (rows, prompt_len), generator=gen).tolist()
    feed = torch.randint(vocab, (warmup + steps, rows), generator=gen).tolist()  # teacher pattern's tokens
    decoder = new_decoder(model, kind, prompt_len + warmup + steps)
    logits = decoder.prefill(prompts)
    all_rows = list(range(rows))

    def step(t: int, logits: torch.Tensor) -> torch.Tensor:
        if pattern == "student":
            toks = [[x] for x in logits.argmax(-1).tolist()]
        else:
            HFBackend._top(logits, TOP_K)
            toks = [[x] for x in feed[t]]
        return decoder.extend(all_rows, toks)

    for t in range(warmup):
        logits = step(t, logits)
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for t in range(warmup, warmup + steps):
            logits = step(t, logits)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for t in range(warmup, warmup + steps):
        logits = step(t, logits)
    return (time.perf_counter() - t0) * 1e3 / steps


@torch.inference_mode()
def max_logit_diff(model: torch.nn.Module, kind: str, rows: int = 8, steps: int = 24, prompt_len: int = 17) -> float:
    """Largest |logit difference| of decoder `kind` to the eager decoder over ragged prompts, a chunk,
    and steps in which some rows get no token (the semantics the static step must keep)."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(vocab, (prompt_len - r % 5,), generator=gen).tolist() for r in range(rows)]
    ref, other = KVDecoder(model), new_decoder(model, kind, prompt_len + 2 * steps)
    worst = (ref.prefill(prompts) - other.prefill(prompts)).abs().max().item()
    for t in range(steps):
        some = list(range(0, rows, 2)) if t % 3 == 2 else list(range(rows))
        toks = [[int(x)] for x in torch.randint(vocab, (len(some),), generator=gen)]
        if t == 5:
            toks[0] = toks[0] * 3  # one multi-token extend (the eager path of the static decoder)
        worst = max(worst, (ref.extend(some, toks) - other.extend(some, toks)).abs().max().item())
    return worst


def bench(shapes: list[str], rows_list: list[int], kinds: list[str], steps: int, rounds: int, device: str,
          dtype: torch.dtype, pattern: str, prompt_len: int) -> list[dict]:
    out = []
    for shape in shapes:
        model = build_model(shape, device, dtype)
        for rows in rows_list:
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(rounds):
                for kind in kinds:
                    times[kind].append(decode_ms(model, rows, steps, kind, prompt_len, pattern=pattern))
            row = {"model": shape, "pattern": pattern, "rows": rows}
            row.update({k: statistics.median(v) for k, v in times.items()})
            out.append(row)
            _print_row(row, kinds)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def _print_row(row: dict, kinds: list[str]) -> None:
    ms = " | ".join(f"{row[k]:.2f}" for k in kinds)
    ratios = " | ".join(f"{row['eager'] / row[k]:.1f}x" for k in kinds if k != "eager")
    print(f"| {row['model']} | {row['pattern']} | {row['rows']} | {ms} | {ratios} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny shapes on the CPU (the default without CUDA).")
    parser.add_argument("--models", default="0.6B,1.7B", help=f"Student shapes: {', '.join(SHAPES)}.")
    parser.add_argument("--teacher-models", default="8B", help="Shapes for the teacher pattern ('' to skip).")
    parser.add_argument("--rows", default="8,32,64")
    parser.add_argument("--teacher-rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    kinds = list(KINDS) if cuda else ["eager", "static", "qwen3"]
    if not cuda:
        torch.set_num_threads(1)
        students, teachers, rows_list, dtype = ["quick"], ["quick"], [8, 32], torch.float32
        args.steps, args.prompt_len, args.rounds = min(args.steps, 16), min(args.prompt_len, 32), 1
    else:
        students = [s for s in args.models.split(",") if s]
        teachers = [s for s in args.teacher_models.split(",") if s]
        rows_list, dtype = [int(r) for r in args.rows.split(",")], getattr(torch, args.dtype)
    print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, prompt {args.prompt_len}, "
          f"{args.steps} timed steps after {args.warmup}, median of {args.rounds} rounds; ms per step\n")
    print("| model | pattern | rows | " + " | ".join(kinds) + " | " +
          " | ".join(f"eager/{k}" for k in kinds if k != "eager") + " |")
    print("|" + " --- |" * (3 + 2 * len(kinds) - 1))
    bench(students, rows_list, kinds, args.steps, args.rounds, device, dtype, "student", args.prompt_len)
    bench(teachers, [args.teacher_rows], kinds, args.steps, args.rounds, device, dtype, "teacher", args.prompt_len)
    check_shape = "0.6B" if cuda else "quick"
    model = build_model(check_shape, device, torch.float32)
    for kind in kinds[1:]:
        diff = max_logit_diff(model, kind)
        print(f"\nfloat32 {check_shape}: max |logit({kind}) - logit(eager)| = {diff:.2e} "
              f"({'ok' if diff <= 1e-5 else 'ABOVE 1e-5'})")


if __name__ == "__main__":
    main()

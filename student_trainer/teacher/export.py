"""`trb-train export`: a dataset of prompts + completions scored once by a running teacher server,
stored as the teacher's top-k ids, logprobs and tail mass at every completion position.

Why: offline distillation (DistillKit, MaxText) trains on stored teacher targets many times over
without a teacher up; `method.name=offline_kd` (offline_data.py) trains on these files with the
same top-k loss the on-policy methods use.

Input rows (.jsonl, .json or .parquet): `prompt` and `completion` text (tokenized with the given
tokenizer, no special tokens added), or `prompt_ids` and `completion_ids` lists. Row r's targets
are the teacher's distributions after prompt + completion[:i] for i = 0..n-1, exactly what the
trainer's `score_targets` asks for a rollout with that prompt and response.

Output: `out/shard_00000.safetensors`, ... Shard s holds input rows [s*shard_rows, (s+1)*shard_rows),
flattened (offsets index them):

    row_index (R,) int64       tokens (ΣL,) int32      seq_offsets (R+1,) int64   prompt_lens (R,) int32
    top_ids (ΣN, K) int32      top_logprobs (ΣN, K) float32                       tail_logprob (ΣN,) float32

with metadata {format, top_k, teacher, tokenizer_fingerprint, shard_rows}. A shard is written to a
temporary name and renamed, so a crash leaves whole shards only; a rerun skips the shards that
exist and writes the rest, so no row is ever stored twice. `manifest.json` is written last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from student_trainer.config import ConfigError, env_api_key
from student_trainer.tasks.math_data import DataError, _rows
from student_trainer.teacher.client import TeacherClient

FORMAT = "trb-topk-v1"


@dataclass(frozen=True)
class Example:
    prompt: list[int]
    completion: list[int]


def read_examples(path: Path, tokenizer: Any = None) -> list[Example]:
    """Every row of a prompts + completions file; a row without both parts is a DataError naming it."""
    examples = []
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt and completion")
        if "prompt_ids" in row and "completion_ids" in row:
            prompt, completion = list(map(int, row["prompt_ids"])), list(map(int, row["completion_ids"]))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            if tokenizer is None:
                raise DataError(f"{where}: text rows need --tokenizer (or give prompt_ids and completion_ids)")
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        else:
            raise DataError(f"{where}: needs prompt and completion (text) or prompt_ids and completion_ids; "
                            f"keys: {', '.join(sorted(row))}")
        if not prompt or not completion:
            raise DataError(f"{where}: an empty prompt or completion")
        examples.append(Example(prompt, completion))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard_{index:05d}.safetensors"


async def score_rows(client: TeacherClient, examples: Sequence[Example], top_k: int) -> list[dict[str, Any]]:
    """The teacher's top-k at each completion position of each example (one /v1/score call)."""
    sequences = [e.prompt + e.completion[:-1] for e in examples]  # the distribution after the last token is unused
    scored = await client.score(sequences, start=[len(e.prompt) - 1 for e in examples], top_k=top_k)
    return [{"ids": s.topk.ids, "logprobs": s.topk.logprobs, "tail": s.topk.tail()} for s in scored]


def _shard_tensors(first_row: int, examples: Sequence[Example], targets: Sequence[dict[str, Any]]) -> dict:
    lens = [len(e.prompt) + len(e.completion) for e in examples]
    return {
        "row_index": torch.arange(first_row, first_row + len(examples), dtype=torch.int64),
        "tokens": torch.tensor([t for e in examples for t in e.prompt + e.completion], dtype=torch.int32),
        "seq_offsets": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64),
        "prompt_lens": torch.tensor([len(e.prompt) for e in examples], dtype=torch.int32),
        "top_ids": torch.cat([t["ids"] for t in targets]).to(torch.int32),
        "top_logprobs": torch.cat([t["logprobs"] for t in targets]).float(),
        "tail_logprob": torch.cat([t["tail"] for t in targets]).float(),
    }


def _check_existing(path: Path, metadata: dict[str, str]) -> None:
    with safe_open(str(path), "pt") as f:
        found = f.metadata() or {}
    for key in ("format", "top_k", "shard_rows", "tokenizer_fingerprint"):
        if found.get(key) != metadata[key]:
            raise DataError(f"{path}: written with {key}={found.get(key)!r}, this export has {metadata[key]!r}; "
                            "use a new --out folder")


async def export(client: TeacherClient, examples: Sequence[Example], out: Path, top_k: int,
                 shard_rows: int = 1024, batch_rows: int = 16, teacher: str = "", fingerprint: str = "",
                 report: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Score every example into `out`, skipping the shards already there; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "top_k": str(top_k), "teacher": teacher, "tokenizer_fingerprint": fingerprint,
                "shard_rows": str(shard_rows)}
    n_shards = -(-len(examples) // shard_rows)
    for s in range(n_shards):
        path, rows = shard_path(out, s), range(s * shard_rows, min((s + 1) * shard_rows, len(examples)))
        if path.exists():
            _check_existing(path, metadata)
            continue
        targets = []
        for i in range(rows.start, rows.stop, batch_rows):
            targets += await score_rows(client, examples[i : min(i + batch_rows, rows.stop)], top_k)
        tmp = path.with_suffix(".tmp")
        save_file(_shard_tensors(rows.start, examples[rows.start : rows.stop], targets), str(tmp), metadata)
        os.replace(tmp, path)  # atomic: a shard is there whole or not at all
        report(f"shard {s + 1}/{n_shards}: rows {rows.start}..{rows.stop - 1}")
    manifest = {**metadata, "top_k": top_k, "shard_rows": shard_rows, "rows": len(examples), "shards": n_shards,
                "positions": sum(len(e.completion) for e in examples)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_shards(out: Path) -> dict[str, torch.Tensor]:
    """Every shard of an export, concatenated in row order (offsets rebased); DataError when incomplete."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{out}: no manifest.json; the export is missing or unfinished (rerun trb-train export)")
    manifest = json.loads(manifest_path.read_text())
    parts = []
    for s in range(manifest["shards"]):
        with safe_open(str(shard_path(out, s)), "pt") as f:
            parts.append({k: f.get_tensor(k) for k in f.keys()})
    tokens_base = torch.tensor([0, *[p["tokens"].numel() for p in parts]]).cumsum(0)
    merged = {k: torch.cat([p[k] for p in parts]) for k in ("row_index", "tokens", "prompt_lens", "top_ids",
                                                             "top_logprobs", "tail_logprob")}
    rebased = [p["seq_offsets"][1:] + base for p, base in zip(parts, tokens_base[:-1], strict=True)]
    merged["seq_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), *rebased])
    if not torch.equal(merged["row_index"], torch.arange(manifest["rows"])):
        raise DataError(f"{out}: rows are missing or repeated across shards")
    merged["top_k"] = torch.tensor(manifest["top_k"])
    return merged


async def _run_export(args: Any) -> dict[str, Any]:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    examples = read_examples(Path(args.data), tokenizer)
    async with TeacherClient(args.url, client_id="export", timeout=args.timeout,
                             api_key=env_api_key()) as client:
        await client.wait_ready(300.0, report=_say)
        info = await (client.check_tokenizer(tokenizer) if tokenizer is not None else client.model_info())
        return await export(client, examples, Path(args.out), args.top_k, args.shard_rows, args.batch_rows,
                            teacher=info.model, fingerprint=info.tokenizer_fingerprint, report=_say)


def _say(message: str) -> None:
    print(f"trb-train export: {message}", file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trb-train export", description="Score prompts + completions through a "
                                     "running teacher server and store its top-k per position (for "
                                     "method.name=offline_kd; docs/offline.md).")
    parser.add_argument("--url", required=True, help="The running teacher server (trb-teacher serve).")
    parser.add_argument("--data", required=True, help=".jsonl / .json / .parquet rows of prompt + completion "
                        "(text) or prompt_ids + completion_ids.")
    parser.add_argument("--out", required=True, help="Output folder of safetensors shards; rerun to resume.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer for text rows (the student's = the teacher's).")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--shard-rows", type=int, default=1024, help="Rows per shard (the unit of resumption).")
    parser.add_argument("--batch-rows", type=int, default=16, help="Rows per /v1/score request.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds one request may take.")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`trb-train export --url URL --data FILE --out DIR`."""
    args = parser().parse_args(argv)
    from student_trainer.teacher.client import TeacherError

    try:
        manifest = asyncio.run(_run_export(args))
    except (ConfigError, DataError, TeacherError) as exc:
        sys.exit(f"trb-train export: {exc}")
    print(json.dumps(manifest))

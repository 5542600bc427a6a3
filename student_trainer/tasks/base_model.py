"""Supervised fine-tuning of tiny Qwen3 models on a task, and greedy pass@1 evaluation.

This is how the shipped teacher and student are made: train from scratch on reference solutions
(loss on the solution tokens and EOS only), then measure greedy accuracy with the task verifier.
It is deliberately plain: one batch layout, AdamW, warmup + cosine decay, no packing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from student_trainer.tasks.arithmetic import Problem, verify

try:
    from transformers import Qwen3Config as _Config
    from transformers import Qwen3ForCausalLM as _CausalLM
except ImportError:  # older transformers: same recipe on the Llama architecture
    from transformers import LlamaConfig as _Config  # type: ignore[assignment]
    from transformers import LlamaForCausalLM as _CausalLM  # type: ignore[assignment]

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """The size of a tiny decoder: width, depth, heads, MLP width and RoPE base.

    A small RoPE base (vs Qwen3's 1e6) keeps every rotary frequency useful over the ~50-token
    sequences of the task, which helps digit alignment.
    """

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_positions: int = 256
    rope_theta: float = 500.0


@dataclass(frozen=True)
class SFTConfig:
    """Optimisation settings for `train`."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    label_smoothing: float = 0.0  # > 0 trains an under-confident model (mass spread over the vocabulary)


def build_model(tokenizer: PreTrainedTokenizerBase, shape: ModelShape, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised Qwen3 causal LM whose vocabulary and special ids match `tokenizer`."""
    config = _Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = _CausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + solution + <eos>` ids and labels that score only solution + EOS.

    Returns (input_ids_B_T, labels_B_T); labels are IGNORE on prompt and padding positions.
    """
    rows, masks = [], []
    for p in problems:
        prompt_ids = tokenizer.encode(p.prompt, add_special_tokens=False)
        solution_ids = tokenizer.encode(p.solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt_ids + solution_ids)
        masks.append([False] * len(prompt_ids) + [True] * len(solution_ids))
    width = max(len(r) for r in rows)
    input_ids_B_T = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels_B_T = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks, strict=True)):
        ids = torch.tensor(row)
        input_ids_B_T[i, : len(row)] = ids
        labels_B_T[i, : len(row)] = torch.where(torch.tensor(mask), ids, IGNORE)
    return input_ids_B_T, labels_B_T


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 10% of it at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_loss(
    model: PreTrainedModel, input_ids_B_T: torch.Tensor, labels_B_T: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (solution + EOS) positions.

    No attention mask is needed: padding is on the right, so causal attention never lets a real
    token see a pad. `label_smoothing` mixes the one-hot target with a uniform one over the
    vocabulary: a model trained so keeps its argmax but samples far from it (a student whose own
    rollouts are poor while its mass on the right token is not small).
    """
    logits_B_T_V = model(input_ids=input_ids_B_T).logits
    return torch.nn.functional.cross_entropy(
        logits_B_T_V[:, :-1].flatten(0, 1).float(), labels_B_T[:, 1:].flatten(), ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    cfg: SFTConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train on `problems` in order, cfg.batch_size at a time, for cfg.steps steps; returns losses.

    Problems are consumed cyclically, so pass at least steps * batch_size of them for one epoch.
    """
    torch.manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="sft", mininterval=2.0)
    for step in bar:
        start = (step * cfg.batch_size) % len(problems)
        batch = [problems[(start + i) % len(problems)] for i in range(cfg.batch_size)]
        input_ids_B_T, labels_B_T = encode_batch(tokenizer, batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = sft_loss(model, input_ids_B_T, labels_B_T, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def greedy_complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (KV cache, left padding, stop at EOS), decoded without special tokens."""
    model.eval()
    outputs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        out_B_T = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        new_B_T = out_B_T[:, enc["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_B_T, skip_special_tokens=True))
    return outputs


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int = 64,
    batch_size: int = 256,
    verifier: Callable[[str, Problem], bool] = verify,
) -> tuple[float, list[str]]:
    """Greedy pass@1 on `problems` with `verifier` (arithmetic's by default); returns (accuracy, completions)."""
    completions = greedy_complete(model, tokenizer, [p.prompt for p in problems], max_new_tokens, batch_size)
    correct = sum(verifier(c, p) for c, p in zip(completions, problems, strict=True))
    return correct / max(1, len(problems)), completions

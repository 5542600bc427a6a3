"""The static decoder gives `KVDecoder`'s logits (float32, to 16 roundings of the logits' scale:
`conftest.f32_tol`) over ragged prompts, rows that stop at different steps, multi-token extends and
capacity growth; its single-token step keeps every tensor at a fixed address (what a CUDA graph
replays); a rollout samples the same tokens with either decoder."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import student_trainer.rollouts.generate as rollout_mod
from conftest import f32_diff, f32_tol
from decoders.choose import make_decoder
from decoders.kv_decode import KVDecoder
from decoders.static_decode import StaticKVDecoder, additive_mask
from student_trainer.methods.behaviors import make_behavior

REPO = Path(__file__).resolve().parents[2]


class Gap(NamedTuple):
    """How far decoders' logits came apart, against what float32 rounding at their scale explains."""

    worst: float  # the largest |logit difference| to the first decoder
    scale: float  # the largest |logit| of the first decoder

    @property
    def ok(self) -> bool:
        return self.worst <= f32_tol(self.scale)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    diff, tol = f32_diff(got, want)
    return diff <= tol


def _random_qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return Qwen3ForCausalLM(cfg).eval()


def _model(name: str, tiny_model: Path) -> torch.nn.Module:
    if name == "random-qwen3":
        return _random_qwen3()
    return AutoModelForCausalLM.from_pretrained(tiny_model if name == "tiny" else REPO / "models" / name).eval()


def _prompts(vocab: int, lengths: tuple[int, ...] = (5, 9, 3, 7)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


def _drive(decoders: list, vocab: int, steps: int = 24) -> Gap:
    """A rollout-like schedule on every decoder: rows stop one by one, some skip steps; every 5th step
    a multi-token extend (a chunk) of some rows. Returns the largest logit difference to the first
    decoder and the largest logit of the first."""
    prompts = _prompts(vocab)
    outs = [d.prefill(prompts) for d in decoders]
    worst = max((o - outs[0]).abs().max().item() for o in outs)
    scale = outs[0].abs().max().item()
    active, gen = list(range(len(prompts))), torch.Generator().manual_seed(1)
    for t in range(steps):
        if t in (6, 11, 17):
            active = active[1:]  # rows stop at different steps and stay as masked columns
        if t % 5 == 4:
            rows = active[:2]
            toks = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (3, 1)][: len(rows)]
        else:  # every third step some rows sit out (a masked column), as in a teacher session
            rows = active[::2] if t % 3 == 2 else active
            toks = [[int(x)] for x in torch.randint(4, vocab, (len(rows),), generator=gen)]
        outs = [d.extend(rows, toks) for d in decoders]
        worst = max(worst, *((o - outs[0]).abs().max().item() for o in outs))
        scale = max(scale, outs[0].abs().max().item())
    assert all(d.lengths == decoders[0].lengths for d in decoders)
    return Gap(worst, scale)


@pytest.mark.parametrize("name", ["arith-student", "arith-teacher", "tiny", "random-qwen3"])
def test_static_logits_equal_eager_decoder(name, tiny_model):
    model = _model(name, tiny_model)
    sized = StaticKVDecoder(model, capacity=9 + 40)
    growing = StaticKVDecoder(model, capacity=10)  # prompt width 9: the first extends already grow it
    gap = _drive([KVDecoder(model), sized, growing], model.config.vocab_size)
    assert gap.ok, gap
    assert sized.capacity == 64 and growing.capacity > 16


@pytest.mark.parametrize("kind", ["eager", "static", "qwen3"])
def test_all_positions_extend_equals_a_full_forward(kind):
    """`extend(..., all_positions=True)`: the logits after every new token, row by row, as a forward
    over each whole sequence gives them (float32, `f32_tol`); rows left out and ragged chunks included."""
    model = _random_qwen3()
    decoder = make_decoder(model, capacity=9 + 16, kind=kind)
    prompts = _prompts(97)
    decoder.prefill(prompts)
    seqs = [list(p) for p in prompts]
    gen = torch.Generator().manual_seed(2)
    for rows, lengths in (([0, 1, 2, 3], (3, 3, 3, 3)), ([3, 1], (4, 1)), ([2, 0, 3], (2, 5, 1))):
        toks = [torch.randint(4, 97, (n,), generator=gen).tolist() for n in lengths]
        got = decoder.extend(rows, toks, all_positions=True)
        want = []
        for row, new in zip(rows, toks, strict=True):
            seqs[row] += new
            with torch.no_grad():
                logits = model(torch.tensor([seqs[row]])).logits[0]
            want.append(logits[-len(new):])  # the positions of the new tokens
        assert got.shape == (sum(lengths), 97)
        assert close(got, torch.cat(want)), f32_diff(got, torch.cat(want))



def test_single_token_step_keeps_fixed_addresses(tiny_model):
    """What a CUDA graph needs: the step writes into the same input, mask, cursor and cache tensors each
    time and only reads the cursor from the device (the CPU runs the very body that CUDA captures)."""
    model = _model("tiny", tiny_model)
    dec, ref = StaticKVDecoder(model, capacity=40), KVDecoder(model)
    prompts = _prompts(model.config.vocab_size)
    dec.prefill(prompts), ref.prefill(prompts)

    def addresses() -> list[int]:
        layer = dec.cache.layers[0]
        return [t.data_ptr() for t in (dec._in_4_B, dec.colmask_B_C, dec.cursor_1, layer.keys, layer.values)]

    before, steps = addresses(), []
    original = dec._step
    dec._step = lambda: steps.append(1) or original()
    for t in range(12):
        rows = [0, 2, 3] if t % 2 else [1, 3]
        a, b = dec.extend(rows, [[5 + t]] * len(rows)), ref.extend(rows, [[5 + t]] * len(rows))
        assert close(a, b), f32_diff(a, b)
    assert addresses() == before and len(steps) == 12
    assert int(dec.cursor_1) == dec.width == ref.mask_B_S.shape[1]


def test_additive_mask_matches_boolean_mask():
    keep = torch.tensor([[[True, False, True]]])
    mask = additive_mask(keep, torch.float32)
    assert mask.shape == (1, 1, 1, 3) and mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_make_decoder_picks_static_on_request_and_falls_back_for_flash_attention(tiny_model):
    model = _model("tiny", tiny_model)
    assert type(make_decoder(model, 0, kind="eager")) is KVDecoder
    assert type(make_decoder(model, 0, kind="static", capacity=32)) is StaticKVDecoder
    with pytest.raises(ValueError, match="decoder"):
        make_decoder(model, 0, kind="fast")
    model.config._attn_implementation = "flash_attention_2"
    assert type(make_decoder(model, 0)) is KVDecoder  # auto on a CPU: neither qwen3 nor static applies
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert type(make_decoder(model, 0, kind="static")) is KVDecoder
    assert any("flash_attention_2" in str(w.message) for w in caught)


@pytest.mark.parametrize("kind", ["static", "qwen3"])
def test_rollout_tokens_equal_with_either_decoder(task_models, kind):
    from transformers import AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(task_models[1]).eval()
    tok = AutoTokenizer.from_pretrained(task_models[1])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["12+34\n", "7*8-5\n", "3+4*2+9\n", "1\n"]]

    def run(kind: str):
        return asyncio.run(rollout_mod.generate(student, prompts, make_behavior("opd"), 0.0, None, 4, 20,
                                                tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0),
                                                decoder=kind))

    eager, other = run("eager"), run(kind)
    assert torch.equal(eager.tokens_B_T, other.tokens_B_T)
    assert torch.equal(eager.response_lens_B, other.response_lens_B)
    assert len(set(eager.response_lens_B.tolist())) > 1 or int(eager.response_lens_B[0]) == 20


def test_hf_backend_sessions_equal_with_either_decoder(tiny_model):
    from teacher_server.backends.hf import HFBackend

    steps = []
    for kind in ("eager", "static"):
        backend = HFBackend(str(tiny_model), decoder=kind)
        state, first = backend.open_session([[5, 6, 7], [8, 9]], top_k=4)
        later = [backend.extend_session(state, rows, toks, 4)
                 for rows, toks in (([0, 1], [[10], [11]]), ([1], [[12, 13]]), ([0], [[14]]))]
        steps.append([first, *later])
        assert state.lengths == [5, 5]
    for a, b in zip(*steps, strict=True):
        assert (a.top_ids == b.top_ids).all()
        assert close(a.top_logprobs, b.top_logprobs), f32_diff(a.top_logprobs, b.top_logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_logits(tiny_model):
    model = _random_qwen3().cuda()
    graph, plain = StaticKVDecoder(model, capacity=20), StaticKVDecoder(model, capacity=20, capture=False)
    assert graph.capture
    gap = _drive([KVDecoder(model), graph, plain], model.config.vocab_size, steps=30)
    assert gap.ok, gap
    assert graph.replays > 0 and not graph._graph_failed
    assert type(make_decoder(model, 0)) is StaticKVDecoder

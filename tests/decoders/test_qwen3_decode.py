"""The hand-written Qwen3 step gives `KVDecoder`'s logits (float32, `conftest.f32_tol`): several batch sizes,
left-padded rows, rows that stop at different steps or sit steps out, chunks and capacity growth;
its weights follow the live model; `make_decoder` picks it for Qwen3 on a CPU and nothing else; a
rollout and a short training run sample the same tokens with it as with the eager decoder.

The logit comparisons run on one torch thread. With more, a GEMM splits its output between threads
by the matrix's shape, so the fused q/k/v and gate/up matrices round a few ulps differently from
transformers' separate ones: 1.3e-5 on arith-teacher at 2 threads (logits up to 16.6, ~7 roundings),
where `KVDecoder` at 1 vs 2 threads differs by 8.3e-6 from itself. The bound scales with the logits
(16 roundings), so it holds at either; `test_logits_at_two_threads` checks it there.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_static_decode import _drive, _model, _prompts, _random_qwen3, close
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from decoders.choose import make_decoder
from decoders.kv_decode import KVDecoder
from decoders.qwen3_decode import Qwen3Decoder, qwen3_unsupported
from decoders.static_decode import StaticKVDecoder


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["arith-student", "arith-teacher", "tiny", "random-qwen3"])
def test_qwen3_logits_equal_eager_decoder(name, tiny_model, one_thread):
    """Ragged prompts, rows stopping at steps 6/11/17, rows sitting out, 2-row chunks, and a decoder
    whose capacity must grow (prompt width 9, capacity 10)."""
    model = _model(name, tiny_model)
    sized, growing = Qwen3Decoder(model, capacity=9 + 40), Qwen3Decoder(model, capacity=10)
    gap = _drive([KVDecoder(model), sized, growing], model.config.vocab_size)
    assert gap.ok, gap
    assert growing.capacity > 16


@pytest.mark.parametrize("lengths", [(4,), (7, 2), (3, 11, 5, 1, 8, 6, 2, 9)])
def test_qwen3_logits_for_batch_sizes_and_one_token_prompts(lengths, one_thread):
    """1, 2 and 8 rows, every row extended every step (the OPD rollout), incl. a one-token prompt and
    a prefill of one-token prompts only (which transformers runs, sizing the buffers)."""
    model = _random_qwen3()
    for prompt_lengths in (lengths, (1,) * len(lengths)):
        prompts = _prompts(model.config.vocab_size, prompt_lengths)
        ref, fast = KVDecoder(model), Qwen3Decoder(model, capacity=max(prompt_lengths) + 30)
        assert close(fast.prefill(prompts), ref.prefill(prompts)), prompt_lengths
        rows, gen = list(range(len(prompts))), torch.Generator().manual_seed(2)
        for step in range(30):
            toks = [[int(x)] for x in torch.randint(4, model.config.vocab_size, (len(rows),), generator=gen)]
            assert close(fast.extend(rows, toks), ref.extend(rows, toks)), (prompt_lengths, step)
        assert fast.lengths == ref.lengths


def test_logits_at_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _model("arith-teacher", None)
        gap = _drive([KVDecoder(model), Qwen3Decoder(model)], model.config.vocab_size)
        assert gap.ok, gap
    finally:
        torch.set_num_threads(threads)


def test_rows_out_of_order_get_their_own_logits(one_thread):
    model = _random_qwen3()
    prompts = _prompts(model.config.vocab_size)
    ref, fast = KVDecoder(model), Qwen3Decoder(model)
    ref.prefill(prompts), fast.prefill(prompts)
    a, b = ref.extend([3, 0, 2], [[5], [6], [7]]), fast.extend([3, 0, 2], [[5], [6], [7]])
    assert a.shape == b.shape == (3, model.config.vocab_size)
    assert close(b, a)


def test_weights_follow_the_live_model(one_thread):
    """A decoder built after an optimizer step decodes with the new weights: the fused copies are
    rebuilt (a decoder lives for one rollout, which one set of weights samples)."""
    model = _random_qwen3()
    prompts, rows = _prompts(model.config.vocab_size), [0, 1, 2, 3]
    steps = [[[5 + t]] * len(rows) for t in range(5)]

    def decode(decoder) -> torch.Tensor:
        decoder.prefill(prompts)
        return torch.stack([decoder.extend(rows, toks) for toks in steps])

    first = Qwen3Decoder(model)
    assert Qwen3Decoder(model).layer_weights is first.layer_weights  # unchanged weights: not fused again
    old = decode(KVDecoder(model))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(input_ids=torch.tensor([prompts[0]])).logits.logsumexp(-1).mean().backward()
    opt.step()
    after = Qwen3Decoder(model)
    assert after.layer_weights is not first.layer_weights
    new = decode(KVDecoder(model))
    assert (new - old).abs().max().item() > 1e-2  # the step changed the logits ...
    assert close(decode(after), new)  # ... and the new decoder has them


def test_make_decoder_picks_qwen3_on_cpu_for_qwen3_only(tiny_model):
    model = _model("tiny", tiny_model)
    assert type(make_decoder(model, 0)) is Qwen3Decoder
    assert type(make_decoder(model, 0, kind="qwen3")) is Qwen3Decoder
    assert type(make_decoder(model, 0, kind="eager")) is KVDecoder  # the escape hatch
    assert type(make_decoder(model, 0, kind="static", capacity=32)) is StaticKVDecoder
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    assert "not a Qwen3ForCausalLM" in qwen3_unsupported(llama)
    assert type(make_decoder(llama, 0)) is KVDecoder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert type(make_decoder(llama, 0, kind="qwen3")) is KVDecoder
    assert any("qwen3 decoder unavailable" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="qwen3 decoder"):
        Qwen3Decoder(llama)


def test_qwen3_with_attention_bias_and_untied_head(one_thread):
    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=61, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero: make them matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    gap = _drive([KVDecoder(model), Qwen3Decoder(model)], cfg.vocab_size)
    assert gap.ok, gap

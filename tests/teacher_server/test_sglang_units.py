"""The SGLang backend's pure pieces: tail mass, chunking, the last-id rewrite, truncation, dtype, limits,
settings and the CLI's handling of the key (no fake server needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from teacher_server.backends.sglang import (
    TOPK_MASS_BOUND,
    as_reported,
    chunks,
    hidden_rows,
    sequence_scores,
    tail_from_top,
)
from teacher_server.backends.sglang_transport import (
    MetaInfo,
    SGLangError,
    error_message,
    max_prompt_len,
    resolve_dtype,
    with_hidden_rows,
)
from teacher_server.settings import ServerSettings

KEY = "sglang-test-key-0123"


def test_tail_from_top_matches_exact_tail() -> None:
    logits = np.random.default_rng(0).normal(size=(6, 50)) * 2
    lp = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(-lp, axis=1)
    for k in (0, 1, 5, 30):
        top = np.take_along_axis(lp, order[:, :k], 1)
        exact = np.logaddexp.reduce(np.take_along_axis(lp, order[:, k:], 1).astype(np.float64), axis=1)
        assert np.abs(tail_from_top(top) - exact).max() <= 1e-4, k
    everything = tail_from_top(lp)  # all mass in the top-k: below the bound, the row says the bound
    np.testing.assert_allclose(everything, np.log(TOPK_MASS_BOUND), rtol=1e-6)
    assert tail_from_top(np.zeros((1, 1), np.float32))[0] == np.float32(np.log(TOPK_MASS_BOUND))  # mass 1 exactly


def test_chunks_cover_in_order_within_budget() -> None:
    costs = [3, 5, 2, 9, 1, 1, 4]
    parts = list(chunks(costs, 6))
    assert [i for part in parts for i in range(len(costs))[part]] == list(range(len(costs)))
    assert all(sum(costs[p]) <= 6 or len(costs[p]) == 1 for p in parts) and list(chunks([], 6)) == []


def test_reported_ids_and_scores_around_the_last_id() -> None:
    assert as_reported([0, 46, 47, 48], 48) == [0, 46, 0, 0]
    seq, entries = [5, 47, 6, 47], [[None, 5, None], [-1.5, 0, None], [-2.0, 6, None], [-0.5, 0, None]]
    top = [None, [[-1.5, 47, None]], [[-2.0, 6, None]], [[-0.5, 47, None]]]
    meta = MetaInfo(prompt_tokens=4, input_token_logprobs=entries, input_top_logprobs=top,
                    output_top_logprobs=[[[-0.1, 3, None]]])
    res = sequence_scores(meta, seq, 0, 1, None, vocab_size=48)
    assert res.next_token_logprobs.tolist() == [-1.5, -2.0, -0.5] and res.top_ids[:, 0].tolist() == [47, 6, 47, 3]
    with pytest.raises(SGLangError, match="alignment is off"):  # a real 0 where 47 was sent is still caught
        sequence_scores(meta, seq, 0, 1, None, vocab_size=49)


def test_a_truncated_prompt_is_an_error_not_a_shift() -> None:
    meta = MetaInfo(prompt_tokens=3, input_token_logprobs=[[None, 1, None], [-1.0, 2, None], [-1.0, 3, None]])
    with pytest.raises(SGLangError, match="truncated"):
        sequence_scores(meta, [1, 2, 3, 4], 0, 0, None, vocab_size=48)


def test_resolve_dtype_as_sglang_does() -> None:
    import torch

    assert resolve_dtype("auto", torch.float32) == "float16" and resolve_dtype("auto", None) == "float16"
    assert resolve_dtype("auto", "float32", "gemma2") == "bfloat16"
    assert resolve_dtype("auto", torch.bfloat16) == "bfloat16" and resolve_dtype("auto", "float16") == "float16"
    assert resolve_dtype("half", torch.bfloat16) == "float16" and resolve_dtype("float", None) == "float32"


def test_limits_and_error_messages() -> None:
    assert max_prompt_len(34, None) == 33 and max_prompt_len(34, 30) == 29 and max_prompt_len(None, None) is None
    refused = httpx.Response(400, json={"error": {"message": "Input length (9 tokens) exceeds ..."}})
    schema = httpx.Response(400, json={"error": "unknown field `top_q`"})
    assert error_message(refused).startswith("Input length") and error_message(schema) == "unknown field `top_q`"
    assert error_message(httpx.Response(502, text="bad gateway")) == "bad gateway"


def test_settings_need_exactly_one_sglang_target() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ServerSettings(model="m", backend="sglang")
    with pytest.raises(ValidationError, match="exactly one"):
        ServerSettings(model="m", backend="sglang", sglang_url="http://127.0.0.1:30000", sglang_engine=True)
    assert ServerSettings(model="m", backend="sglang", sglang_url="http://127.0.0.1:30000").backend == "sglang"
    with pytest.raises(ValidationError, match="only a server"):
        ServerSettings(model="m", backend="sglang", sglang_engine=True, sglang_api_key=KEY)
    cfg = ServerSettings(model="m", backend="sglang", sglang_url="http://127.0.0.1:30000", sglang_api_key=KEY)
    assert KEY not in repr(cfg) and KEY not in str(cfg.model_dump())


def test_cli_never_prints_the_sglang_key(tiny_model: Path) -> None:
    from conftest import REPO

    env = {**os.environ, "TRB_TEACHER_SGLANG_API_KEY": "zq9xk-secret-0123", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "teacher_server.cli", "serve", "--model", str(tiny_model),
                           "--backend", "sglang", "--sglang-engine"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "only a server at sglang_url takes an API key" in proc.stderr
    assert "zq9x" not in proc.stderr + proc.stdout  # pydantic's message shows the input (the key's start)


def _answer(rows: str, n: int = 1) -> bytes:
    one = '{"text": "", "meta_info": {"prompt_tokens": 2, "cached_tokens": 0, "hidden_states": [%s], ' \
          '"input_token_logprobs": [[null, 5, null], [-0.25, 6, null]]}}' % rows
    return ("[" + ", ".join([one] * n) + "]").encode()


def test_hidden_rows_parse_into_one_float32_array_beside_the_small_fields() -> None:
    metas = with_hidden_rows(_answer("[[0.5, -1e-3, 3], [4, 5.25, -6e10]]", n=2), 2)
    assert len(metas) == 2 and metas[0].prompt_tokens == 2 and metas[0].input_token_logprobs[1] == (-0.25, 6, None)
    want = np.array([[0.5, -1e-3, 3], [4, 5.25, -6e10]], np.float32)
    assert metas[1].hidden.dtype == np.float32 and np.array_equal(metas[1].hidden, want)
    assert hidden_rows(metas[0], length=2, start=1).tolist() == want[1:].tolist()
    assert with_hidden_rows(_answer("[]").replace(b', "hidden_states": [[]]', b""), 1)[0].hidden is None


@pytest.mark.parametrize(("rows", "says"), [
    ("[[1, 2], [3]]", "not all the same length"),  # a flat buffer would hide it: 3 numbers for 2 rows
    ("[[1, null]]", "not a finite number"),  # orjson writes NaN and inf as null
    ("[[1, true]]", "not a finite number"),
    ("[1, 2]", "not a list of rows"),
])
def test_malformed_hidden_rows_are_errors_that_say_what(rows: str, says: str) -> None:
    with pytest.raises(SGLangError, match=says):
        with_hidden_rows(_answer(rows), 1)


def test_an_answer_of_the_wrong_shape_is_an_error() -> None:
    with pytest.raises(SGLangError, match="answered 2 results for a batch of 3"):
        with_hidden_rows(_answer("[[1]]", n=2), 3)
    with pytest.raises(SGLangError, match="not JSON"):
        with_hidden_rows(b"[{", 1)
    with pytest.raises(SGLangError, match="without meta_info"):
        with_hidden_rows(b'[{"text": ""}]', 1)


def _flat_meta(top: list, k: int, **overrides: object) -> MetaInfo:
    """A meta_info whose input top-k is in SGLang's flat base64 form (the fake's encoder builds it)."""
    from fake_sglang import _flat_fields

    fields = {"prompt_tokens": 3, "input_token_logprobs": [[None, 5, None], [-1.5, 47, None], [-2.0, 6, None]],
              "output_top_logprobs": [[[-0.1, 3, None], [-4.0, 9, None]]], **_flat_fields(top, k, b64=True)}
    return MetaInfo(**{**fields, **overrides})


def test_the_flat_base64_top_k_scores_as_the_nested_lists_do() -> None:
    top = [None, [[-1.5, 47, None], [-2.5, 8, None]], [[-2.0, 6, None], [None, 7, None]]]
    nested = MetaInfo(prompt_tokens=3, input_token_logprobs=_flat_meta(top, 2).input_token_logprobs,
                      input_top_logprobs=top, output_top_logprobs=[[[-0.1, 3, None], [-4.0, 9, None]]])
    want = sequence_scores(nested, [5, 47, 6], 0, 2, None, vocab_size=49)
    got = sequence_scores(_flat_meta(top, 2), [5, 47, 6], 0, 2, None, vocab_size=49)
    assert np.array_equal(got.top_ids, want.top_ids) and np.array_equal(got.top_logprobs, want.top_logprobs)
    assert got.top_logprobs[1, 1] == -np.inf and np.array_equal(got.tail_logprob, want.tail_logprob)
    one = _flat_meta([None], 2, input_token_logprobs=[[None, 5, None]], prompt_tokens=1)  # the last position only
    assert sequence_scores(one, [5], 0, 2, None, vocab_size=49).top_ids.tolist() == [[3, 9]]


@pytest.mark.parametrize(("overrides", "says"), [
    ({"input_top_logprobs_null_prefix": 0}, "after 0 null rows"),
    ({"input_top_logprobs_shape": (2, 1)}, r"is \(2, 1\)"),
    ({"input_top_logprobs_val_flat_b64_dtype": "bfloat16"}, "bfloat16"),
    ({"input_top_logprobs_val_flat_b64": "not base64!"}, "does not decode"),
    ({"input_top_logprobs_idx_flat_b64": "AAAAAA=="}, "holds 4 values and 1 ids"),
    ({"output_top_logprobs": []}, "no output top-k row"),
])
def test_a_malformed_flat_top_k_is_an_error_that_says_what(overrides: dict, says: str) -> None:
    top = [None, [[-1.5, 47, None], [-2.5, 8, None]], [[-2.0, 6, None], [-3.0, 7, None]]]
    with pytest.raises(SGLangError, match=says):
        sequence_scores(_flat_meta(top, 2, **overrides), [5, 47, 6], 0, 2, None, vocab_size=49)

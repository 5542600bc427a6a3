"""The binary codec: exact round trips, and malformed payloads rejected cleanly."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared import codec
from shared.protocol import ScoreRequest, ScoreResponse, SequenceScores


def _scores(n: int, k: int, dtype: str = "float32") -> SequenceScores:
    rng = np.random.default_rng(n * 31 + k)
    return SequenceScores(start=0, top_ids=rng.integers(0, 1000, (n, k)).astype(np.int32),
                          top_logprobs=-rng.random((n, k)).astype(dtype), tail_logprob=-rng.random(n).astype(dtype),
                          next_token_logprobs=-rng.random(max(n - 1, 0)).astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_json_and_msgpack_decode_to_identical_arrays(dtype: str) -> None:
    resp = ScoreResponse(model="m", results=[_scores(7, 5, dtype), _scores(1, 3, dtype)])
    via_json = codec.decode(codec.encode(resp, codec.JSON), ScoreResponse, codec.JSON)
    via_pack = codec.decode(codec.encode(resp, codec.MSGPACK), ScoreResponse, codec.MSGPACK)
    for a, b, ref in zip(via_json.results, via_pack.results, resp.results, strict=True):
        for name in ("top_ids", "top_logprobs", "tail_logprob", "next_token_logprobs"):
            assert np.array_equal(getattr(b, name), getattr(ref, name))
            assert getattr(b, name).dtype == getattr(ref, name).dtype
            assert np.array_equal(getattr(a, name).astype(getattr(ref, name).dtype), getattr(ref, name))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(st.sampled_from([np.int32, np.float32, np.float16, np.int64]),
                  hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_array_round_trip_is_bit_exact(arr: np.ndarray) -> None:
    blob = msgpack.packb({"a": arr}, default=codec._pack_default)
    out = codec.decode_raw(blob, codec.MSGPACK)["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def _ext(dtype: object, shape: object, raw: object) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb([dtype, shape, raw]))})


@pytest.mark.parametrize("blob", [
    b"\xc1", b"\x92\x01", b"not msgpack at all \xff\xfe",
    _ext("|O", [1], b"\x00" * 8),                       # object arrays are never built
    _ext("<f4", [1 << 40], b""),                        # a shape that would allocate terabytes
    _ext("<f4", [3], b"\x00" * 8),                      # byte count does not match the shape
    _ext("<f4", [-1], b""),
    _ext("<f4", "abc", b""),
    msgpack.packb({"a": msgpack.ExtType(9, b"xx")}),    # unknown extension
    msgpack.packb({"a": msgpack.ExtType(1, b"\xc1")}),  # garbage header
])
def test_malformed_binary_is_a_codec_error(blob: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode_raw(blob, codec.MSGPACK)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_escape_as_other_errors(blob: bytes) -> None:
    from pydantic import ValidationError

    try:
        codec.decode(blob, ScoreRequest, codec.MSGPACK)
    except (codec.CodecError, ValidationError):
        pass


def test_binary_is_much_smaller_than_json() -> None:
    resp = ScoreResponse(model="m", results=[_scores(1024, 20) for _ in range(4)])
    assert len(codec.encode(resp, codec.MSGPACK)) * 3 < len(codec.encode(resp, codec.JSON))


def test_media_type_negotiation() -> None:
    assert codec.media_type_of(None) == codec.JSON
    assert codec.media_type_of("application/json; charset=utf-8") == codec.JSON
    assert codec.media_type_of("application/x-msgpack") == codec.MSGPACK
    assert codec.media_type_of("text/plain") is None

"""Two encodings of the protocol models: JSON for people, msgpack with raw array bytes for programs.

A numpy array travels in msgpack as one extension object: (dtype, shape, little-endian bytes).
Only a short whitelist of dtypes is accepted on decode, and the byte count must match the shape,
so a malformed or hostile payload is a `CodecError`, never a giant allocation or an object array.
"""

from __future__ import annotations

import json
import math
from typing import TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel

JSON = "application/json"
MSGPACK = "application/x-msgpack"

_ARRAY_EXT = 1
_DTYPES = {"<i4": np.int32, "<i8": np.int64, "<f4": np.float32, "<f2": np.float16}
_MAX_ELEMENTS = 1 << 31

M = TypeVar("M", bound=BaseModel)


class CodecError(ValueError):
    """The bytes are not a valid encoding of the expected model."""


def _pack_default(obj: object) -> msgpack.ExtType:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        dtype = arr.dtype.newbyteorder("<").str
        if dtype not in _DTYPES:
            raise TypeError(f"cannot encode array of dtype {arr.dtype}")
        payload = msgpack.packb([dtype, list(arr.shape), arr.astype(dtype, copy=False).tobytes()])
        return msgpack.ExtType(_ARRAY_EXT, payload)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> object:
    if code != _ARRAY_EXT:
        raise CodecError(f"unknown msgpack extension type {code}")
    try:
        dtype, shape, raw = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CodecError(f"bad array header: {exc}") from exc
    if dtype not in _DTYPES or not isinstance(shape, list) or not isinstance(raw, bytes):
        raise CodecError(f"bad array header: dtype={dtype!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 4:
        raise CodecError(f"bad array shape {shape!r}")
    count = math.prod(shape)
    if count > _MAX_ELEMENTS or count * np.dtype(dtype).itemsize != len(raw):
        raise CodecError(f"array of shape {shape} does not match its {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode(model: BaseModel, media_type: str = JSON) -> bytes:
    """Encode a protocol model; arrays become lists in JSON and raw bytes in msgpack."""
    if media_type == MSGPACK:
        return msgpack.packb(model.model_dump(mode="python"), default=_pack_default)
    return model.model_dump_json().encode()


def decode_raw(body: bytes, media_type: str = JSON) -> object:
    """Parse bytes into plain Python objects (arrays stay numpy arrays in msgpack)."""
    if media_type == MSGPACK:
        try:
            return msgpack.unpackb(body, ext_hook=_unpack_ext, strict_map_key=True)
        except CodecError:
            raise
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CodecError(f"malformed msgpack body: {type(exc).__name__} {exc}".strip()) from exc
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed JSON body: {exc}") from exc


def decode(body: bytes, model_type: type[M], media_type: str = JSON) -> M:
    """Decode bytes into `model_type`; raises CodecError or pydantic.ValidationError."""
    return model_type.model_validate(decode_raw(body, media_type))


def media_type_of(content_type: str | None) -> str | None:
    """Map a Content-Type / Accept value to one of our two encodings (None if neither)."""
    if not content_type:
        return JSON
    value = content_type.split(";")[0].strip().lower()
    if value in (MSGPACK, "application/msgpack", "application/vnd.msgpack"):
        return MSGPACK
    if value in (JSON, "*/*", "application/*"):
        return JSON
    return None

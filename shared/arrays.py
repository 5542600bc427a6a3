"""An ndarray field type that serialises to nested lists in JSON and to raw bytes in msgpack.

One pydantic schema serves both encodings: `model_dump(mode="json")` turns arrays into lists
(for people and curl), `model_dump(mode="python")` keeps them as numpy arrays so the binary codec
can ship their bytes untouched. Validation accepts either form, so a decoded JSON body and a
decoded msgpack body produce the same model, with the same dtypes.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema


def _validator(dtype: str | None):
    def to_array(value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value if dtype is None or value.dtype == dtype else value.astype(dtype)
        try:
            arr = np.asarray(value, dtype=dtype or np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"expected a rectangular numeric array: {exc}") from exc
        if arr.dtype == object:
            raise ValueError("expected a rectangular numeric array")
        return arr

    return to_array


def _to_list(arr: np.ndarray) -> list:
    return arr.tolist()


def _schema(item: str, ndim: int, description: str) -> dict:
    schema: dict = {"type": item}
    for _ in range(ndim):
        schema = {"type": "array", "items": schema}
    schema["description"] = description
    return schema


def array_field(dtype: str | None, ndim: int, item: str, description: str) -> Any:
    """An annotated ndarray type; `dtype=None` keeps whatever float dtype the producer chose."""
    return Annotated[
        np.ndarray,
        PlainValidator(_validator(dtype)),
        PlainSerializer(_to_list, when_used="json"),
        WithJsonSchema(_schema(item, ndim, description)),
    ]

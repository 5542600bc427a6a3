"""CPU to read an SGLang answer that carries hidden states: the route the teacher takes (simdjson, the rows
into one float buffer) against the one it replaced (pydantic, a Python float per number, then numpy).

Synthetic answers of SGLang's shape (float32 values written as shortest round-trip decimals, as SGLang's
orjson writes them): the shipped teacher's width (128) at the proxy bench's size (1,056 positions), and a
4096-wide model. No engine needed; the least CPU of 5 interleaved rounds each.

    .venv/bin/python -m bench.bench_sglang_parse
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, TypeAdapter

from teacher_server.backends.sglang_transport import with_hidden_rows


class _OldMeta(BaseModel):  # the pydantic route: hidden states as nested lists of floats
    prompt_tokens: int
    cached_tokens: int = 0
    hidden_states: list[list[list[float]]] | None = None


class _OldOutput(BaseModel):
    meta_info: _OldMeta


_OLD = TypeAdapter(list[_OldOutput])


def answer(width: int, length: int, batch: int) -> bytes:
    rng = np.random.default_rng(0)
    return json.dumps([{"text": "", "meta_info": {"prompt_tokens": length, "cached_tokens": 0, "hidden_states": [
        rng.standard_normal((length, width)).astype(np.float32).tolist()]}} for _ in range(batch)]).encode()


def cpu_ms(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return 1000 * (time.process_time() - started)


def main() -> None:
    print("answer | MB | pydantic + numpy, ms CPU | simdjson buffer, ms CPU | ratio")
    for width, length, batch in ((128, 33, 32), (4096, 32, 8)):
        raw = answer(width, length, batch)

        def old() -> list[np.ndarray]:
            return [np.asarray(o.meta_info.hidden_states[0], np.float32) for o in _OLD.validate_json(raw)]

        def new() -> list[np.ndarray]:
            return [m.hidden for m in with_hidden_rows(raw, batch)]

        assert all(np.array_equal(a, b) for a, b in zip(old(), new(), strict=True))
        rounds = [(cpu_ms(old), cpu_ms(new)) for _ in range(5)]
        a, b = min(r[0] for r in rounds), min(r[1] for r in rounds)
        print(f"{batch} x {length} positions, width {width} | {len(raw) / 1e6:.1f} | {a:.1f} | {b:.1f} | {a / b:.2f}")


if __name__ == "__main__":
    main()

"""Schemathesis against the live server's own OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

import httpx
import msgpack
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import ServerProcess

CASES_PER_OPERATION = 160  # operations with a body or a path parameter reach the cap; >= 500 in all


def _packable(value: object) -> object:
    """msgpack holds 64-bit ints only; bigger generated ints travel as strings (still invalid input)."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, list):
        return [_packable(v) for v in value]
    if isinstance(value, dict):
        return {k: _packable(v) for k, v in value.items()}
    return value


@schemathesis.serializer("application/x-msgpack")
def _msgpack(ctx: object, value: object) -> bytes:
    return msgpack.packb(_packable(value))


def test_fuzz_openapi_no_5xx(teacher: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{teacher.url}/openapi.json")
    calls, statuses = 0, {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run_case(case: schemathesis.Case) -> None:
            nonlocal calls
            response = case.call(timeout=60)
            calls += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        given(case=operation.as_strategy())(run_case)()
    print(f"fuzzed {calls} requests; statuses {dict(sorted(statuses.items()))}")
    assert calls >= 500
    assert httpx.get(f"{teacher.url}/health").status_code == 200
    assert httpx.post(f"{teacher.url}/v1/score", json={"sequences": [[1, 2]]}).status_code == 200

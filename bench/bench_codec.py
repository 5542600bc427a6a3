"""Target 3: msgpack vs JSON for a top-20 score response of 16 x 1024 positions.

The payload is what `/v1/score` returns for 16 sequences of 1024 positions: int32 top-20 ids,
float32 top-20 logprobs, the tail logprob and the next-token logprob per position. Encode is
`shared.codec.encode`, decode is `shared.codec.decode` into the pydantic `ScoreResponse` (what the
client does), so the figures include validation. JSON size depends on how many digits an id has,
so the payload is measured at the task vocabulary (79 ids) and at Qwen3's (151,936 ids).

    .venv/bin/python -m bench.bench_codec
"""

from __future__ import annotations

import numpy as np

from bench.common import Section, base_parser, interleave, limit_threads, machine_info, median, report
from shared import codec
from shared.protocol import ScoreResponse, SequenceScores

VOCABS = {"task vocab (79)": 79, "Qwen3 vocab (151,936)": 151_936}


def payload(vocab: int, rows: int = 16, positions: int = 1024, k: int = 20, seed: int = 0) -> ScoreResponse:
    """A score response with realistic values: sorted negative logprobs, ids spread over the vocab."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(rows):
        ids = rng.integers(0, vocab, size=(positions, k), dtype=np.int32)
        logits = rng.normal(0.0, 3.0, size=(positions, k + 1))
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        top = -np.sort(-logp[:, :k], axis=-1)
        results.append(SequenceScores(
            start=0, top_ids=ids, top_logprobs=top.astype(np.float32),
            tail_logprob=logp[:, k].astype(np.float32),
            next_token_logprobs=top[:-1, 0].astype(np.float32)))
    return ScoreResponse(model="bench", results=results)


def _codec_times(response: ScoreResponse, rounds: int) -> dict[str, list[float]]:
    """Wall seconds per call of encode and decode in both encodings, interleaved."""
    variants = {}
    for media in (codec.JSON, codec.MSGPACK):
        body = codec.encode(response, media)
        variants[f"{media} encode"] = lambda m=media: codec.encode(response, m)
        variants[f"{media} decode"] = lambda b=body, m=media: codec.decode(b, ScoreResponse, m)
    return {name: t.wall for name, t in interleave(variants, rounds).items()}


def measure(section: Section, name: str, vocab: int, rounds: int) -> None:
    """Size and encode + decode time of both encodings for one vocabulary; adds rows to `section`."""
    response = payload(vocab)
    sizes = {media: len(codec.encode(response, media)) for media in (codec.JSON, codec.MSGPACK)}
    times = _codec_times(response, rounds)
    total = {m: median(times[f"{m} encode"]) + median(times[f"{m} decode"]) for m in sizes}
    for media, label in ((codec.JSON, "JSON"), (codec.MSGPACK, "msgpack (binary)")):
        enc, dec = median(times[f"{media} encode"]) * 1e3, median(times[f"{media} decode"]) * 1e3
        section.add(f"{label}, {name}", f"{sizes[media] / 1e6:.2f} MB; encode {enc:.1f} ms + decode {dec:.1f} ms")
    section.add(f"size JSON / binary, {name}", "", sizes[codec.JSON] / sizes[codec.MSGPACK], ">= 3")
    section.add(f"encode+decode time JSON / binary, {name}", f"{total[codec.MSGPACK] * 1e3:.2f} ms binary",
                total[codec.JSON] / total[codec.MSGPACK], ">= 5")


def run(threads: int = 1, quick: bool = False) -> Section:
    limit_threads(threads)
    section = Section("3. Wire encoding: top-20 for 16 x 1024 positions",
                      "ScoreResponse with int32 ids and float32 logprobs; decode includes pydantic "
                      f"validation; medians of {3 if quick else 7} interleaved rounds.")
    for name, vocab in VOCABS.items():
        measure(section, name, vocab, rounds=3 if quick else 7)
    return section


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    info = machine_info(args.threads)
    print(report([run(args.threads, args.quick)], info))


if __name__ == "__main__":
    main()

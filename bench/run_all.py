"""Run every benchmark, print one report, and rewrite the results block of docs/performance.md.

    .venv/bin/python -m bench.run_all              # ~7 min on 2 cores + 3-8 for section 7; rewrites the docs
    .venv/bin/python -m bench.run_all --no-write   # print only
    .venv/bin/python -m bench.run_all --no-engines # without section 7 (real vLLM and SGLang)

Section 7 (bench/bench_engine_proxy.py) starts real vLLM and SGLang from the venvs that `make engines`
builds; an engine whose venv is absent is skipped, with a line saying so here and a row in its table.

Only the block between the two markers in docs/performance.md is replaced; the analysis around it
is written by people and kept.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from bench import bench_codec, bench_engine_proxy, bench_rollout, bench_server, bench_step_vs_trl
from bench.common import REPO, Section, base_parser, limit_threads, machine_info, report

DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin (written by bench/run_all.py) -->", "<!-- bench:end -->"


def run_everything(threads: int, quick: bool, engines: bool = True) -> list[Section]:
    """The sections in target order: 1, 2, 6 (server), 3 (codec), 4 (rollout), 5 (step vs TRL), 7 (the
    teacher in front of real engines, unless `engines` is off)."""
    sections = bench_server.run(threads, quick)
    sections.insert(2, bench_codec.run(threads, quick))
    sections.insert(3, bench_rollout.run(threads, quick))
    sections.insert(4, bench_step_vs_trl.run(threads, quick))
    if engines:
        if missing := bench_engine_proxy.missing_engines():
            print(f"bench_engine_proxy: no {' or '.join(missing)} venv under {bench_engine_proxy.engines_dir()}, "
                  "so section 7 skips it (`make engines` builds them)", file=sys.stderr)
        sections.append(bench_engine_proxy.run(threads, quick))
    return sections


def summary(sections: list[Section]) -> str:
    """One line per target row: how many passed, and which missed."""
    rows = [(s.title, r) for s in sections for r in s.rows if r.status]
    missed = [f"- MISS: {title.split('.')[0]}. {r.variant} ({r.ratio:.3g}, target {r.target})" for title, r in rows
              if r.status == "MISS"]
    passed = sum(r.status == "PASS" for _, r in rows)
    return "\n".join([f"{passed} of {len(rows)} target rows pass.", *missed]) + "\n"


def rewrite_doc(block: str, path: Path = DOC) -> None:
    """Replace the text between the markers (or create the file with just the block)."""
    text = path.read_text() if path.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print the report without touching the docs")
    ap.add_argument("--no-engines", action="store_true", help="leave out section 7 (real vLLM and SGLang)")
    args = ap.parse_args()
    limit_threads(args.threads)
    info = machine_info(args.threads)
    started = time.perf_counter()
    sections = run_everything(args.threads, args.quick, engines=not args.no_engines)
    command = " ".join([".venv/bin/python -m bench.run_all", *map(shlex.quote, sys.argv[1:])])
    block = (f"Produced by `{command}` in {time.perf_counter() - started:.0f} s.\n\n"
             f"{summary(sections)}\n{report(sections, info)}")
    print(block)
    if not args.no_write and not args.quick:
        rewrite_doc(block)
        print(f"rewrote the results block of {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()

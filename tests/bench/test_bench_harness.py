"""The benchmark harness measures what it says: CPU of the whole server tree, TRL at full length."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from bench.common import REPO, load_model, process_tree

SLEEPER = ("import subprocess, sys, time; "
           "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "print(p.pid, flush=True); time.sleep(60)")


def test_process_tree_includes_grandchildren() -> None:
    # The teacher server runs its model in a child process; its CPU must be counted too.
    child = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        tree = process_tree(child.pid)
        assert tree[0] == child.pid
        assert grandchild in tree
        assert len(tree) == 2
    finally:
        subprocess.run(["kill", str(grandchild)], check=False)
        child.kill()
        child.wait()


@pytest.mark.slow
def test_trl_harness_generates_every_token() -> None:
    """`Trainer.train()` re-aligns EOS with the tokenizer; the harness must undo it, or the trained
    student stops after its short answers and TRL does less work per step than OPD."""
    pytest.importorskip("trl")
    from bench.bench_step_vs_trl import _prompts, trl_block

    student, teacher = REPO / "models" / "arith-student", REPO / "models" / "arith-teacher"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 8 rows of the trained student all answer within ~40 tokens: without the fix, generation
        # stops there and the harness's own assertion (every completion has max_new tokens) fails.
        times = trl_block(student, load_model(teacher), _prompts(16), batch=8, max_new=64, steps=1)
    assert len(times.wall) == len(times.cpu) == 1  # the assertion on full-length completions is inside

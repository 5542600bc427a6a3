"""bench/run_all runs section 7 (the teacher in front of real engines); without the engine venvs it skips
them with a message instead of failing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_engine_proxy, run_all


def test_without_engine_venvs_section_7_skips_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRB_ENGINES_DIR", str(tmp_path))  # no venv here
    monkeypatch.setattr(run_all.bench_server, "run", lambda threads, quick: [])  # only section 7 is under test
    for module in (run_all.bench_codec, run_all.bench_rollout, run_all.bench_step_vs_trl):
        monkeypatch.setattr(module, "run", lambda threads, quick: None)
    assert bench_engine_proxy.missing_engines() == ["vLLM", "SGLang"]
    sections = [s for s in run_all.run_everything(1, quick=True) if s is not None]
    assert "no vLLM or SGLang venv under" in capsys.readouterr().err
    (section,) = sections
    assert section.title.startswith("7. ")
    assert [r.variant for r in section.rows] == ["vLLM: venv missing (scripts/engines/vllm.sh)",
                                                 "SGLang: venv missing (scripts/engines/sglang.sh)"]
    assert not any(r.status for r in section.rows)  # no target row, so no MISS in the summary
    assert run_all.summary(sections) == "0 of 0 target rows pass.\n"

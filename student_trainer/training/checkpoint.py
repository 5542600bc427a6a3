"""Checkpoints that survive a kill at any instant, and load with `from_pretrained`.

A checkpoint is a folder `step_000123/` holding the student (`save_pretrained` + tokenizer) and
`trainer_state.pt` (optimizer, LR scheduler, step, RNG states). It is written under a temporary
name and renamed into place, then `latest` (a one-line file) is replaced atomically; a reader
follows `latest`, so it only ever sees complete folders.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(root: Path, step: int, model: Any, tokenizer: Any, trainer_state: dict[str, Any], keep: int = 2,
         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `root/step_{step}` atomically, point `latest` at it, prune old ones; returns the folder.

    `state_dict` replaces the model's own weights (FSDP's gathered float32 masters written through a
    bf16 copy); the config then records their dtype, so `from_pretrained` loads them as saved.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if state_dict is not None:
        _record_dtype(tmp / "config.json", next(iter(state_dict.values())).dtype)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _record_dtype(config_file: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_file.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # left by a kill during a save
        shutil.rmtree(stale, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).exists() else None


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, weights_only=False)

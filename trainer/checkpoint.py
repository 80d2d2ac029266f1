"""Checkpoints: model, update rule (base optimizer, gate, counters), scheduler, step, RNG and data
position in one file per step, written to a temporary name and renamed, so a killed save never
replaces the last good checkpoint. Loading takes the newest checkpoint that reads back whole."""

import os
import random
from pathlib import Path

import torch


def checkpoint_dir(out: str) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str, step: int, model, rule, scheduler, extra: dict, keep: int = 2):
    ckpt_dir = checkpoint_dir(out)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(), "rule": rule.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        **extra,
    }
    final = ckpt_dir / f"step_{step:08d}.pt"
    tmp = final.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return final


def load_latest_checkpoint(out: str, log=print):
    """The newest checkpoint that loads, or None; a torn or corrupt file is reported and skipped."""
    for path in sorted(checkpoint_dir(out).glob("step_*.pt"), reverse=True):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or corrupt file: fall back to the previous one
            log(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one")
    return None


def restore_rng(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

"""Checkpoints through torch.distributed.checkpoint (DCP): model and update rule (its base optimizer,
gate and counters: rule.sharded_state_dict), scheduler, step and counters, sharded as the model is (a
run resumes on another number of ranks); plus each rank's RNG state. A save goes to step_N.tmp/ and is
renamed to step_N/ once every rank has written, so a killed save never replaces the last good
checkpoint. Loading takes the newest checkpoint that reads back whole on every rank."""

import contextlib
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .distributed import SINGLE, Dist


def checkpoint_dir(out: str) -> Path:
    return Path(out) / "checkpoints"


def _state(model, rule, scheduler, train_state: dict, plugins: dict) -> dict:
    state = {**rule.sharded_state_dict(model), "scheduler": scheduler.state_dict(), "train": dict(train_state)}
    if plugins:
        state["plugins"] = {name: p.state_dict() for name, p in plugins.items()}
    return state


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load that it assumes a single process: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out: str, step: int, model, rule, scheduler, train_state: dict, dist: Dist = SINGLE,
                    keep: int = 2, plugins: dict | None = None) -> Path:
    """Collective: every rank calls it. train_state is a dict of plain numbers (step is added); plugins
    {name: object with state_dict / load_state_dict} (e.g. CAPO's moments)."""
    ckpt_dir = checkpoint_dir(out)
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f"step_{step:08d}.tmp"
    if dist.main:
        for stale in ckpt_dir.glob("*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{dist.rank}.pt")
    with _single_process_quiet():
        dcp.save(_state(model, rule, scheduler, {**train_state, "step": step}, plugins), checkpoint_id=tmp,
                 no_dist=dist.world == 1)
    dist.barrier()  # every rank's files are written before the rename makes the checkpoint visible
    if dist.main:
        if final.exists():  # a step redone after resuming from an older checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in ckpt_dir.glob("step_*") if p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def complete_checkpoints(out: str) -> list:
    """Finished checkpoint directories, newest first."""
    return sorted((p for p in checkpoint_dir(out).glob("step_*") if p.is_dir() and p.suffix != ".tmp"),
                  reverse=True)


def load_latest_checkpoint(out: str, model, rule, scheduler, dist: Dist = SINGLE, log=print,
                           train_template: dict | None = None, plugins: dict | None = None) -> dict | None:
    """Loads the newest whole checkpoint into model, rule and scheduler and restores this rank's RNG;
    returns its train_state (the keys of train_template, plain values), or None when there is none. A torn
    or corrupt one is reported and skipped."""
    for path in complete_checkpoints(out):
        template = {"step": 0, "wall_time_s": 0.0, "backward_passes": 0, **(train_template or {})}
        state = _state(model, rule, scheduler, template, plugins)
        error = None
        try:
            _keep_saved_rule_keys(state, path, log if dist.main else None)
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=path, no_dist=dist.world == 1)
            rng_file = path / f"rng_rank{dist.rank}.pt"
            rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
        except (Exception, CheckpointException) as e:  # truncated or corrupt: try the previous checkpoint
            error = f"{type(e).__name__}: {e}"
        if dist.any(error is not None):
            if dist.main:
                log(f"checkpoint {path} is unreadable ({error or 'on another rank'}); trying the previous one")
            continue
        rule.load_sharded_state_dict(model, state)
        for name, plugin in (plugins or {}).items():
            plugin.load_state_dict(state["plugins"][name])
        scheduler.load_state_dict(state["scheduler"])
        if rng is not None:
            restore_rng(rng)
        elif dist.main:
            log(f"checkpoint {path} has no RNG state for rank {dist.rank} (saved on fewer ranks); RNG not restored")
        return state["train"]
    return None


def _keep_saved_rule_keys(state: dict, path: Path, log):
    """Drops from the template the rule's own entries (counters, gate) that a checkpoint written by an earlier
    version does not hold, so that it loads (DCP refuses a missing key) and the rule's load_own_state_dict takes
    their defaults. Model, optimizer and everything else must be there whole."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in state["rule"] if f"rule.{k}" not in saved and not any(
        name.startswith(f"rule.{k}.") for name in saved)]
    for k in missing:
        del state["rule"][k]
    if missing and log is not None:
        log(f"checkpoint {path} predates the update rule's {', '.join(missing)}: their defaults are used")


def restore_rng(rng: dict):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

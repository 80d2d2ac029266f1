"""gxpo-train: train a causal LM with GRPO, SFPO or GXPO on a verifiable task.

  gxpo-train --model tiny-random --task arithmetic --algo gxpo --steps 20 --out runs/x
  gxpo-train --config trainer/configs/cpu_default.toml --gxpo.K 5 --optim.lr 1e-6

Every config field can be set as --section.field VALUE (see trainer/config.py for the fields).
"""

import argparse
import gc
import sys

from .config import load_config

SHORTCUTS = {"task": "task.name"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="gxpo-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a TOML file; command-line keys override it")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    known, rest = parser.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--") or i + 1 >= len(rest):
            parser.error(f"expected --key VALUE pairs, got {' '.join(rest[i:])!r}")
        key = key[2:].replace("-", "_")
        overrides.append((SHORTCUTS.get(key, key), rest[i + 1]))
        i += 2
    if known.resume:
        overrides.append(("resume", "true"))
    return known.config, overrides


def main(argv=None):
    from .train import train

    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)
    except ValueError as e:
        sys.exit(f"gxpo-train: {e}")
    import torch.distributed as dist

    distributed = lambda: dist.is_available() and dist.is_initialized()  # noqa: E731
    try:
        train(cfg)
        if distributed():  # tear down together, after the FSDP2 state that refers to the group is gone
            gc.collect()
            dist.barrier()
    finally:
        if distributed():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

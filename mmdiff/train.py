"""``accelerate launch -m mmdiff.train --config configs/ldm-cpu.yaml [--output-dir D] [KEY=VALUE ...]``.

Trains the stage a config names (vae, ldm or gan). Overrides are config keys with dots,
e.g. ``train.batch_size=8 data.cache=/data/cache``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from accelerate import PartialState

from .data.dataset import CacheError
from .training import ConfigError, load_config, train
from .training.checkpoint import CheckpointError
from .training.trainer import TrainingInterrupted


def build_parser(prog: str = "python -m mmdiff.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train an mmdiff stage (vae, ldm, gan).")
    parser.add_argument("--config", required=True, help="YAML config, or a name in configs/ (e.g. gan-tiny)")
    parser.add_argument("--output-dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--max-minutes", type=float,
                        help="also stop after this much wall time (minutes); default train.max_minutes")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in the run folder) or a checkpoint path")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from these weights (a checkpoint, run or pipeline folder) with a fresh schedule: "
                             "fine-tuning; layers that do not fit start fresh (default train.init_from)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m mmdiff.train") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.init_from:
            config.setdefault("train", {})["init_from"] = args.init_from
        output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
        final = train(config, output_dir, max_steps=args.max_steps, resume=args.resume,
                      max_minutes=args.max_minutes)
    except (ConfigError, CacheError, CheckpointError, FileNotFoundError) as exc:
        print(f"mmdiff train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        if PartialState().is_main_process:
            print(f"mmdiff train: {exc}", file=sys.stderr)
        return 130
    finally:
        PartialState().destroy_process_group()
    if PartialState().is_main_process:
        print(f"trained {config['stage']}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

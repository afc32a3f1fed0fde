"""``prunet``: a thin command line over the library. It parses, calls, prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from prunet import __version__


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


def _recipe(args: argparse.Namespace):
    from prunet.config import load_recipe, parse_override

    overrides = dict(parse_override(s) for s in args.set or [])
    return load_recipe(args.recipe, overrides)


def cmd_models(args: argparse.Namespace) -> int:
    from prunet.models import create_model, get_model_info, list_models

    print(f"{'name':<16} {'parameters':>12}  {'input':<12} description")
    for name in list_models():
        info = get_model_info(name)
        n = sum(p.numel() for p in create_model(name).parameters()) if args.count else None
        count = f"{n:,}" if n is not None else "-"
        print(f"{name:<16} {count:>12}  {'x'.join(map(str, info.input_shape)):<12} {info.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from prunet.pipeline import run

    recipe = _recipe(args)
    recipe = dataclasses.replace(recipe, prune=dataclasses.replace(recipe.prune, rounds=[]))
    run(recipe, run_dir=args.run_dir)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from prunet.pipeline import run

    recipe = _recipe(args)
    if not recipe.prune.rounds:
        raise UsageError(f"{args.recipe} has no prune.rounds; use 'prunet train' for dense training only")
    if args.from_checkpoint and not Path(args.from_checkpoint).is_file():
        raise UsageError(f"--from: checkpoint {args.from_checkpoint} does not exist")
    run(recipe, run_dir=args.run_dir, from_checkpoint=args.from_checkpoint)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunet",
        description="Learn which connections matter, prune the rest, retrain (Han et al., NIPS 2015).",
    )
    parser.add_argument("--version", action="version", version=f"prunet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--count", action="store_true", help="build each model and count its parameters")
    p.set_defaults(func=cmd_models)

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", help="YAML recipe (see recipes/)")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="override a recipe field, e.g. --set train.epochs=2 (repeatable)")
        p.add_argument("--run-dir", help="run folder (default: <output_dir>/<name> from the recipe)")

    p = sub.add_parser("train", help="train a dense model from a recipe")
    recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="dense training, then the recipe's prune -> retrain rounds")
    recipe_args(p)
    p.add_argument("--from", dest="from_checkpoint", metavar="CHECKPOINT",
                   help="start from this dense checkpoint instead of training")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from prunet.checkpoint import CheckpointError
    from prunet.config import ConfigError
    from prunet.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, UsageError) as e:
        print(f"prunet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunet: interrupted; checkpoints written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

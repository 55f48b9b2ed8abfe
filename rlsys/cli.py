"""`rlsys` command line: `rlsys train RECIPE [key=value ...]`, `rlsys eval ...`,
`rlsys export CHECKPOINT OUT_DIR`.

User mistakes (bad recipe, bad override, missing file) print one `error:` line and exit 2;
a run whose trainer cannot take a step (non-finite loss or gradient) prints one `error:` line
(the step, the reason, the last checkpoint) and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from rlsys import __version__
from rlsys.config import ConfigError, load_recipe, to_yaml

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlsys",
        description="RL post-training for language models (GRPO on Ray actors).",
        epilog="Example: rlsys train recipes/quickstart.yaml steps=10 trainer.lr=1e-5",
    )
    p.add_argument("--version", action="version", version=f"rlsys {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser(
        "train",
        help="train a policy from a YAML recipe",
        description="Train a policy from a YAML recipe; key=value overrides apply on top "
        "(dotted keys, e.g. rollout.temperature=0.8).",
    )
    t.add_argument("recipe", help="path to a recipe .yaml")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    t.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    e = sub.add_parser(
        "eval",
        help="evaluate a saved checkpoint on the recipe's held-out split",
        description="Greedy accuracy and pass@k of a Hugging Face checkpoint on the recipe's "
        "held-out split; prints a table and writes JSON.",
    )
    e.add_argument("recipe", help="path to a recipe .yaml (task, reward, eval settings)")
    e.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="Hugging Face folder (runs/x/final), a run folder (its final/) or a training "
        "checkpoint (runs/x/checkpoints/step-N: its policy)",
    )
    e.add_argument("--out", help="JSON output path (default: the model folder's eval.json)")
    x = sub.add_parser(
        "export",
        help="write a training checkpoint's policy as a Hugging Face folder",
        description="Validate a checkpoint and copy its policy (safetensors, config, "
        "tokenizer) to OUT_DIR, which AutoModelForCausalLM.from_pretrained loads.",
    )
    x.add_argument(
        "checkpoint",
        help="a checkpoint (runs/x/checkpoints/step-N), or a run or checkpoints folder (latest)",
    )
    x.add_argument("out_dir", help="new or empty output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after flags (`train r.yaml --print-config a=1`).
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-")]
    if bad or (extra and args.command not in ("train", "eval")):
        hint = ""
        if bad and all("=" in x for x in bad):  # `--steps=5`: an override with dashes
            hint = f" (recipe overrides take no dashes: {' '.join(x.lstrip('-') for x in bad)})"
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}{hint}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        if args.command == "export":
            from rlsys.trainer.checkpoint import export

            print(f"exported: {export(args.checkpoint, args.out_dir)}")
            return 0
        cfg = load_recipe(args.recipe, args.overrides)
        if args.command == "eval":
            from rlsys.evaluate import evaluate_checkpoint

            evaluate_checkpoint(cfg, args.checkpoint, args.out)
            return 0
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from rlsys.controller import TrainingFailed, train

        try:
            train(cfg, args.recipe)
        except TrainingFailed as e:  # diverged: the message says what stays and what next
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

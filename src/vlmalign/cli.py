"""Command line: vlmalign train | eval | data | demo.

    vlmalign train align-cg train.max_steps=200 train.lr=5e-4
    vlmalign train configs/align.yaml data.root=/data/coco
    vlmalign eval runs/align-cg/checkpoint-90
    vlmalign data shapes --out data/shapes --n 1280 --seed 0
    vlmalign demo [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console

console = Console()


def _cmd_train(args: argparse.Namespace) -> int:
    from vlmalign.config import load_config
    from vlmalign.eval.evaluate import METRICS_NAME, EvalData, comparison_table, evaluate
    from vlmalign.eval.report import write_metrics
    from vlmalign.paths import recipe_config
    from vlmalign.train.trainer import train

    cfg = load_config(recipe_config(args.config), args.overrides)
    result = train(cfg)
    console.print(f"checkpoint: {result.checkpoint}")
    if cfg.train.eval_at_end:
        model = result.model
        metrics = evaluate(model, EvalData.prepare(model, cfg), cfg)
        write_metrics(result.checkpoint / METRICS_NAME, metrics, meta={"recipe": cfg.recipe})
        console.print(comparison_table({cfg.recipe: metrics}, f"{cfg.recipe}: held-out evaluation"))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlmalign.eval.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.overrides)
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from vlmalign.data.shapes import write_shapes

    meta = write_shapes(args.out, args.n, seed=args.seed)
    console.print(f"wrote shapes to {args.out}: {meta.get('counts', meta)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlmalign.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, extra=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmalign", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe: vlmalign train RECIPE|CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="recipe id (align, align-cg, align-clip) or a YAML file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-3")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on its held-out split")
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/coco")
    e.set_defaults(fn=_cmd_eval)

    d = sub.add_parser("data", help="write datasets")
    dsub = d.add_subparsers(dest="dataset", required=True)
    s = dsub.add_parser("shapes", help="write the procedural shapes dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=1280)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_data)

    m = sub.add_parser("demo", help="train align, align-cg and align-clip on shapes and compare")
    m.add_argument("--quick", action="store_true", help="a ~2 minute version")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("overrides", nargs="*", help="dotted overrides applied to every recipe")
    m.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from vlmalign.config import ConfigError
    from vlmalign.models.registry import UnknownIdError

    try:
        return args.fn(args)
    except (ConfigError, UnknownIdError) as e:
        console.print(f"[red]config error:[/] {e}")
        return 2
    except FileNotFoundError as e:
        console.print(f"[red]not found:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

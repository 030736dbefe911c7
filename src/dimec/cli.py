"""`dimec` command line. Every user-facing error is one clear message (no traceback), exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dimec.errors import DimecError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON config file (sections data, model, train, cost, calibration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--task", help="shortcut for --set data.task=TASK")
    p.add_argument("--model", help="shortcut for --set model.name_or_path=PATH")


def _run_config(args: argparse.Namespace):
    from dimec.config import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "task", None):
        overrides.insert(0, f"data.task={args.task}")
    if getattr(args, "model", None):
        overrides.insert(0, f"model.name_or_path={args.model}")
    return load_run_config(args.config, overrides)


def _stage_config(args: argparse.Namespace):
    """A stage on an existing run: its saved config, with any --set overrides applied."""
    from dimec.config import RunConfig, apply_overrides
    from dimec.pipeline import load_run_config

    cfg = load_run_config(Path(args.run_dir))
    return RunConfig.from_dict(apply_overrides(cfg.to_dict(), args.overrides)) if args.overrides else cfg


def cmd_run(args: argparse.Namespace) -> None:
    from dimec.pipeline import format_table, run_all

    report = run_all(_run_config(args), Path(args.run_dir))
    print(format_table(report))
    print(f"\nwrote {args.run_dir}/metrics.json")


def cmd_train(args: argparse.Namespace) -> None:
    from dimec.pipeline import train_stage

    result = train_stage(_run_config(args), Path(args.run_dir))
    print(f"best epoch {result.best_epoch} (score {result.best_score:.4f}), "
          f"{result.samples_per_second:.1f} training samples/s; model in {args.run_dir}/model")
    c = result.calibration
    print("exit temperatures (mobile/edge/cloud) " + "/".join(f"{t:.2f}" for t in c["temperatures"])
          + "; validation ECE before -> after: "
          + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(c["ece_before"], c["ece_after"], strict=True)))


def cmd_calibrate(args: argparse.Namespace) -> None:
    from dimec.pipeline import calibrate_stage

    s = calibrate_stage(Path(args.run_dir), _stage_config(args))
    print(f"alpha={s['alpha']} beta={s['beta']} expected reward={s['expected_reward']:.4f} "
          f"pools={s['pool_counts']}; router in {args.run_dir}/router.json")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dimec.pipeline import evaluate_stage, format_table

    print(format_table(evaluate_stage(Path(args.run_dir), _stage_config(args))))


def texts_from_args(texts: list[str], file: str | None) -> list[str]:
    """Texts given on the command line, then the non-empty lines of `file` (one text per line)."""
    from dimec.errors import DataError

    texts = list(texts)
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"file not found: {path}", "give a text file with one text per line")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    return texts


def cmd_route(args: argparse.Namespace) -> None:
    from dimec.pipeline import route_texts

    texts = texts_from_args(args.texts, args.file)
    for answer in route_texts(Path(args.run_dir), texts, mode=args.mode):
        print(json.dumps(answer))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train, calibrate and evaluate in one run directory")
    _config_args(p)
    p.add_argument("--run-dir", default="runs/default")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="fine-tune the multi-exit model and record training dynamics")
    _config_args(p)
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=cmd_train)

    for name, func, text in (("calibrate", cmd_calibrate, "choose thresholds, build pools and the router"),
                             ("evaluate", cmd_evaluate, "cloud-only, DIMEC Fixed and Dynamic on the test split")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
        p.set_defaults(func=func)

    p = sub.add_parser("route", help="route texts (arguments or --file) and answer each on its tier")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="a text file, one text per line")
    p.add_argument("--mode", default="fixed", choices=("fixed", "dynamic"))
    p.set_defaults(func=cmd_route)

    _attach_optional(sub)
    return parser


def _attach_optional(sub) -> None:
    """Commands from the experiment and serving packages, attached when their modules are present."""
    try:
        from dimec.experiments.reproduce import add_reproduce_arguments, main_reproduce
    except ImportError:
        pass
    else:
        p = sub.add_parser("reproduce", help="every method on the paper's tasks: Table I, ablations, plots")
        add_reproduce_arguments(p)
        p.set_defaults(func=main_reproduce)
    try:
        from dimec.serving.cli import attach_serving_commands
    except ImportError:
        pass
    else:
        attach_serving_commands(sub)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DimecError as exc:
        print(f"dimec: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dimec: interrupted; finished epochs are checkpointed, run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

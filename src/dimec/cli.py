"""`dimec` command line. Every user-facing error is one clear message (no traceback), exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dimec.cli_helpers import texts_from_args
from dimec.errors import DimecError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON config file (sections data, model, train, cost, calibration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--task", help="shortcut for --set data.task=TASK")
    p.add_argument("--model", help="shortcut for --set model.name_or_path=PATH")
    p.add_argument("--cross-fit", type=int, metavar="K",
                   help="shortcut for --set train.cross_fit=K: K fold models give every training row an "
                        "out-of-fold answer, used as calibration rows (K >= 2; 0: off)")


def _run_config(args: argparse.Namespace):
    from dimec.config import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "cross_fit", None) is not None:
        overrides.insert(0, f"train.cross_fit={args.cross_fit}")
    if getattr(args, "task", None):
        overrides.insert(0, f"data.task={args.task}")
    if getattr(args, "model", None):
        overrides.insert(0, f"model.name_or_path={args.model}")
    return load_run_config(args.config, overrides)


def _stage_config(args: argparse.Namespace):
    """A stage on an existing run: its saved config, with the target options and --set overrides applied."""
    from dimec.config import RunConfig, apply_overrides
    from dimec.pipeline import load_saved_config

    cfg = load_saved_config(Path(args.run_dir))
    overrides = _target_overrides(args) + list(args.overrides)
    return RunConfig.from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg


def _target_overrides(args: argparse.Namespace) -> list[str]:
    """--max-loss / --delta / --budget / --policy / --loss as calibration.* settings. A new target replaces
    the saved one whole: --budget clears a saved max-loss and delta, --max-loss a saved budget."""
    out = []
    if getattr(args, "policy", None):
        out.append(f"calibration.policy={args.policy}")
    if getattr(args, "loss", None):
        out.append(f"calibration.loss={args.loss}")
    if getattr(args, "control", None):
        out.append(f"calibration.control={args.control}")
    if getattr(args, "budget", None) is not None:
        text = args.budget.strip()
        cut = text.endswith("%")
        try:
            value = float(text.rstrip("%"))
        except ValueError:
            from dimec.errors import ConfigError

            raise ConfigError(f"--budget must be a mean cost or a cut like 45%, got {args.budget!r}") from None
        out += ["calibration.max_loss=null", "calibration.delta=null",
                f"calibration.budget={'null' if cut else value}", f"calibration.budget_cut={value if cut else 'null'}"]
    if getattr(args, "max_loss", None) is not None:
        out += [f"calibration.max_loss={args.max_loss}", "calibration.budget=null", "calibration.budget_cut=null",
                f"calibration.delta={'null' if args.delta is None else args.delta}"]
    elif getattr(args, "delta", None) is not None:
        out.append(f"calibration.delta={args.delta}")
    return out


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
    v = s["validation"]
    winner = f" (auto chose {s['winner']})" if "winner" in s else ""
    if s.get("what_the_data_can_carry"):
        print(f"what the data can carry: {s['what_the_data_can_carry']['text']}")
    rows = {k: n for k, n in s.get("calibration_rows", {}).items() if n}
    where = "validation" if set(rows) <= {"validation"} else \
        "calibration rows: " + " + ".join(f"{n} {k}" for k, n in rows.items())
    print(f"policy {s['policy']}{winner}: {s['describe']}\n"
          f"target: {s['target']}; {s.get('how', '')}\n"
          f"on {where} ({v['samples']} samples): {v['accuracy_change_pt']['estimate']:+.2f} pt, "
          f"cost {v['cost_change_pct']:+.1f}% against cloud-only; router in {args.run_dir}/router.json")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dimec.pipeline import evaluate_stage, format_table

    print(format_table(evaluate_stage(Path(args.run_dir), _stage_config(args), other_costs=args.other_costs)))


def cmd_settings(args: argparse.Namespace) -> None:
    from dimec.config import describe_settings

    rows = describe_settings() + _serving_settings()
    rows = [r for r in rows if not args.section or r["key"].startswith(f"{args.section}.")]
    if not rows:
        sections = sorted({r["key"].rsplit(".", 1)[0] for r in describe_settings() + _serving_settings()})
        raise DimecError(f"no settings in section {args.section!r}", f"sections: {', '.join(sections)}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {r['type']}, default {json.dumps(r['default'])}\n{'':<{width}}  {r['help']}")


def cmd_route(args: argparse.Namespace) -> None:
    from dimec.pipeline import route_texts

    texts = texts_from_args(args.texts, args.file)
    for answer in route_texts(Path(args.run_dir), texts, mode=args.mode):
        print(json.dumps(answer))


def _serving_settings() -> list[dict]:
    """Every serving section's settings (serving/settings.py: server, client, live, demo, sources...), when
    serving is installed."""
    settings = _optional("dimec.serving.settings")
    return settings.describe() if settings is not None else []


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

    p = sub.add_parser("calibrate", help="fit the served policy on validation to meet a stated loss or budget")
    p.add_argument("run_dir")
    p.add_argument("--max-loss", type=float, metavar="POINTS",
                   help="accuracy points below cloud-only the policy may lose (default 0.5)")
    p.add_argument("--delta", type=float, help="with --max-loss: the bound holds with probability >= 1 - delta")
    p.add_argument("--budget", metavar="COST|PCT%", help="instead: mean cost at most COST, or a cut of PCT%%")
    p.add_argument("--control", choices=("point", "expected"),
                   help="without --delta: 'point' (the validation estimate within --max-loss) or 'expected' "
                        "(conformal risk control: within --max-loss on average over calibration draws)")
    p.add_argument("--policy", help="the policy to fit: auto (default: the cheapest that meets the target), "
                                    "cascade, edge-cascade, cloud-early-exit, hybrid-centroid, hybrid-learned, ...")
    p.add_argument("--loss", choices=("accuracy", "disagreement"),
                   help="accuracy (needs labels) or disagreement with the cloud exit (label-free)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="the served policy, DIMEC Fixed and Dynamic against cloud-only on test")
    p.add_argument("run_dir")
    p.add_argument("--other-costs", action="store_true",
                   help="evaluate a policy calibrated under other costs than the run's current ones")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("settings", help="list every setting (the run's, --set SECTION.KEY=VALUE, and serving's) "
                                        "with type, default, meaning")
    p.add_argument("section", nargs="?", help="only this section (and those under it): data, model, train, cost, "
                                              "calibration; server, server.limits, client, live, demo, sources, ...")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("route", help="route texts (arguments or --file) and answer each as deployed")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="a text file, one text per line")
    p.add_argument("--mode", default="policy", choices=("policy", "dimec-fixed", "dimec-dynamic"),
                   help="policy: the calibrated router.json (default); or the paper's routers")
    p.set_defaults(func=cmd_route)

    _attach_optional(sub)
    return parser


def _attach_optional(sub) -> None:
    """Commands from the experiment and serving packages. They are left out only when an optional extra
    they need is not installed; any other import error (a bug in dimec) is raised, not hidden."""
    reproduce = _optional("dimec.experiments.reproduce")
    if reproduce is not None:
        p = sub.add_parser("reproduce", help="every method on the paper's tasks: Table I, ablations, plots")
        reproduce.add_reproduce_arguments(p)
        p.set_defaults(func=reproduce.main_reproduce)
    serving = _optional("dimec.serving.cli")
    if serving is not None:
        serving.attach_serving_commands(sub)


def _optional(module: str):
    """The module, or None when a third-party package it imports is missing (an extra not installed)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "dimec").split(".")[0] == "dimec":
            raise
        return None


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
    except OSError as exc:  # a file the user named cannot be read or written: their move, not a bug
        print(f"dimec: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dimec: interrupted; finished epochs are checkpointed, run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

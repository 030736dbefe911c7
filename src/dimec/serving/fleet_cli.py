"""Command-line pieces for many sources (attached by serving/cli.py): the client's constraint options,
`dimec plan` and `dimec monitor`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dimec.errors import ConfigError


# ---- `dimec client` / `serve-all`: constraints, budget, advice ----------------------------------------------------
def add_fleet_client_args(p: argparse.ArgumentParser) -> None:
    """The options of the client's fleet settings, generated from their declarations (serving/phone/settings.py,
    listed by `dimec settings client`); serving/cli.py builds and checks the section from them."""
    from dimec.serving import settings as st

    g = p.add_argument_group("constraints (docs/fleet.md; `dimec settings client`)")
    st.add_section_options(g, st.CLIENT_SECTION)
    g.add_argument("--ignore-advice", action="store_true", help="do not honour the edge's PA-MDI advice "
                                                                "(client.honour_advice false)")


# ---- `dimec plan` and `dimec monitor` ------------------------------------------------------------------------------
def attach_fleet_commands(sub) -> None:
    p = sub.add_parser("plan", help="accuracy, latency, money and exposure of every policy; Pareto front; the "
                                    "policy a set of constraints picks")
    p.add_argument("run_dir")
    p.add_argument("--profile", help="cost profile in ms (default RUN_DIR/profile.json); required: latency is "
                                     "reported in milliseconds, which only a measured profile gives (measure one "
                                     "with `dimec profile RUN_DIR`)")
    p.add_argument("--split", default="validation", choices=("validation", "test"),
                   help="where the figures are measured (choices are made on validation)")
    p.add_argument("--policies", help="JSON file of candidate policies ({\"policies\": [router.json entries with "
                                      "a name]}); default: what calibration chooses from (every configuration of "
                                      "auto's families) plus the paper's other baselines")
    p.add_argument("--cloud-price", type=float, default=1.0, help="money per 1,000 texts through the whole cloud model")
    p.add_argument("--edge-price", type=float, default=0.0, help="money per 1,000 texts through the edge's layers")
    p.add_argument("--trusted", default="", help="tiers that do not count as exposure: 'edge' and/or 'cloud'")
    p.add_argument("--max-loss", type=float, help="points of accuracy below cloud-only, at most")
    p.add_argument("--max-latency-ms", type=float, help="mean latency per text, at most")
    p.add_argument("--max-money", type=float, help="money per 1,000 texts, at most")
    p.add_argument("--max-exposure", type=float, help="share of texts leaving the device (untrusted tiers), at most")
    p.add_argument("--private", action="store_true", help="shorthand for --max-exposure 0")
    p.add_argument("--objective", default="cost", choices=("cost", "accuracy", "latency", "money", "exposure"),
                   help="what the pick optimises among the policies that meet the constraints")
    p.add_argument("--out", help="folder for plan.json and plan.png (default RUN_DIR/plan)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("monitor", help="compare live traffic (Prometheus /metrics) with the calibration data; "
                                       "exit 1 on drift")
    p.add_argument("urls", nargs="+", help="edge, cloud or gateway base URLs")
    p.add_argument("--reference", help="run directory, package or drift_reference.json (default: fetched from "
                                       "the servers)")
    p.add_argument("--threshold", type=float, default=0.25, help="PSI above which a distribution has drifted")
    p.add_argument("--min-samples", type=int, default=100, help="live samples needed for a verdict")
    p.add_argument("--interval", type=float, help="seconds: compare only the traffic of this interval")
    p.add_argument("--metrics-token-file", help="file whose first line is the servers' metrics token (default: env "
                                                "DIMEC_METRICS_TOKEN; needed when they were started with one)")
    p.set_defaults(func=cmd_monitor)


def cmd_monitor(args) -> None:
    from dimec.serving.ops.monitor import monitor, read_reference

    reference = read_reference(args.reference) if args.reference else None
    token = os.environ.get("DIMEC_METRICS_TOKEN") or None
    if args.metrics_token_file:
        try:
            token = Path(args.metrics_token_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise ConfigError(f"cannot read the metrics token from {args.metrics_token_file} ({exc})") from None
    status = monitor(args.urls, reference, args.threshold, args.min_samples, args.interval, token=token)
    if status:
        sys.exit(status)


def cmd_plan(args) -> None:
    from dimec.rundir import RunDir
    from dimec.serving.ops.planning import PlanConstraints, plan_run

    trusted = tuple(t.strip() for t in args.trusted.split(",") if t.strip())
    constraints = PlanConstraints(max_loss=args.max_loss, max_latency_ms=args.max_latency_ms,
                                  max_money=args.max_money, max_exposure=0.0 if args.private else args.max_exposure)
    out = Path(args.out) if args.out else RunDir(args.run_dir).plan
    plan_run(Path(args.run_dir), args.profile, constraints, args.objective, args.split, args.policies,
             args.cloud_price, args.edge_price, trusted, out, log=print)

"""Command-line options of live control, for `dimec serve cloud` and `dimec client` (serving/cli.py calls these)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dimec.errors import ConfigError
from dimec.serving.live.controller import LiveControl, LiveSettings
from dimec.serving.live.ledger import DEFAULT_RATE


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shadow-rate must be a number in [0, 1], got {value!r}") from None
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"--shadow-rate must be in [0, 1], got {value}")
    return rate


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", metavar="RUN_DIR",
                   help="cloud only: live control (docs/live-control.md) of the policy in RUN_DIR/router.json: "
                        "shadow answers, POST /v1/feedback, GET /v1/policy; changes are written to that router.json")
    p.add_argument("--live-observe-only", action="store_true", help="with --live: report the bound, never move")
    p.add_argument("--feedback-rate", type=float, default=LiveSettings.feedback_rate,
                   help="feedback labels per second per token (bursts up to 10x)")


def live_from_args(args) -> LiveControl | None:
    if not getattr(args, "live", None):
        return None
    if args.tier != "cloud":
        raise ConfigError("--live is for the cloud tier (it answers the shadows)", "dimec serve cloud ... --live RUN_DIR")
    path = Path(args.live)
    path = path / "router.json" if path.is_dir() else path
    if not args.feedback_rate > 0:
        raise ConfigError(f"--feedback-rate must be > 0, got {args.feedback_rate}")
    settings = LiveSettings(enabled=not args.live_observe_only, feedback_rate=args.feedback_rate,
                            feedback_burst=10 * args.feedback_rate)
    return LiveControl.from_router_file(path, 0, settings)  # the label count comes with the model (attach_live)


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shadow-rate", type=_rate, default=DEFAULT_RATE,
                   help=f"share of texts the cloud also answers, off the critical path, for the live loss bound "
                        f"(default {DEFAULT_RATE:g}; 0: off; a cloud without --live turns it off)")
    p.add_argument("--no-follow-policy", action="store_true",
                   help="do not poll the cloud's GET /v1/policy for new versions of the policy")


def attach_client(client, args, cloud_url: str | None, token: str | None) -> None:
    """Shadow sender and policy follower on a MobileClient, when it has a cloud and routes by its router."""
    from dimec.serving.live.http import PolicyFollower, ShadowSender, apply_policy

    if not cloud_url or client.router is None:
        return
    client.live = ShadowSender(cloud_url, token, LiveSettings(shadow_rate=args.shadow_rate),
                               cloud_exit_layer=client.mobile.exit_layers[2])  # rate 0: counts texts only
    if not args.no_follow_policy:  # closed with the sender, when the client closes
        client.live.follower = PolicyFollower(cloud_url, token, lambda p: apply_policy(client, p)).start()

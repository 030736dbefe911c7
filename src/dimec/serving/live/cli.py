"""Command-line options of live control, for `dimec serve cloud` and `dimec client` (serving/cli.py calls these).
The settings are LiveSettings (section live of `dimec settings`); the options are generated from them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dimec.config import add_options, options_section
from dimec.errors import ConfigError
from dimec.serving.live.controller import LIVE_SECTION, LiveControl, LiveSettings

SERVER_OPTIONS = ("feedback_rate",)
CLIENT_OPTIONS = ("shadow_rate",)


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", metavar="RUN_DIR",
                   help="cloud only: live control (docs/live-control.md) of the policy in RUN_DIR/router.json: "
                        "shadow answers, POST /v1/feedback, GET /v1/policy; changes are written to that router.json")
    p.add_argument("--live-observe-only", action="store_true", help="with --live: report the bound, never move")
    add_options(p, LiveSettings, SERVER_OPTIONS)


def settings_from_args(args, base: LiveSettings | None = None) -> LiveSettings:
    """`base` (from --settings; None: the defaults) with the live options given, checked. --feedback-rate also
    sets the burst to 10x (as its help says); --live-observe-only turns `enabled` off."""
    settings = options_section(LiveSettings, args, f"{LIVE_SECTION}.", base, SERVER_OPTIONS + CLIENT_OPTIONS)
    changes = {}
    if getattr(args, "feedback_rate", None) is not None:
        changes["feedback_burst"] = 10 * settings.feedback_rate
    if getattr(args, "live_observe_only", False):
        changes["enabled"] = False
    return dataclasses.replace(settings, **changes).check()


def live_from_args(args, settings: LiveSettings | None = None) -> LiveControl | None:
    if not getattr(args, "live", None):
        return None
    if args.tier != "cloud":
        raise ConfigError("--live is for the cloud tier (it answers the shadows)", "dimec serve cloud ... --live RUN_DIR")
    path = Path(args.live)
    path = path / "router.json" if path.is_dir() else path
    settings = settings if settings is not None else settings_from_args(args)
    return LiveControl.from_router_file(path, 0, settings)  # the label count comes with the model (attach_live)


def add_client_args(p: argparse.ArgumentParser) -> None:
    add_options(p, LiveSettings, CLIENT_OPTIONS)
    p.add_argument("--no-follow-policy", action="store_true",
                   help="do not poll the cloud's GET /v1/policy for new versions of the policy")


def attach_client(client, args, cloud_url: str | None, token: str | None, settings: LiveSettings | None = None) -> None:
    """Shadow sender and policy follower on a MobileClient, when it has a cloud and routes by its router."""
    from dimec.serving.live.http import PolicyFollower, ShadowSender, apply_policy

    if not cloud_url or client.router is None:
        return
    settings = settings if settings is not None else settings_from_args(args)
    client.live = ShadowSender(cloud_url, token, settings,
                               cloud_exit_layer=client.mobile.exit_layers[2])  # rate 0: counts texts only
    if not args.no_follow_policy:  # closed with the sender, when the client closes
        client.live.follower = PolicyFollower(cloud_url, token, lambda p: apply_policy(client, p)).start()

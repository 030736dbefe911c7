"""Every serving setting in one registry: `dimec settings` lists these sections, `dimec serve` and `dimec client`
generate their options from them, save the checked values beside the package they run and read such a file
back with `--settings FILE` (docs/serving.md, "Settings").

    server              ServerSettings (below): threads, device, precision, batching on/off, log level
    server.limits       servers/server.py Limits: request sizes and bytes in flight
    server.batching     servers/batcher.py BatchingConfig: dynamic batching
    live                live/controller.py LiveSettings: the cloud's live control, the client's shadow sample
    client              phone/settings.py FleetClientSettings: privacy, budget, deadlines, the edge's advice
    client.mobile       phone/settings.py MobileSettings: backend, routing, retries
    client.timeouts     phone/remote.py Timeouts
    demo                deploy/web.py WebConfig: the demo page's proxy
    sources.scheduling  servers/sources.py SchedulingConfig (the --sources file's `scheduling:`)
    sources.allocation  servers/sources.py AllocationConfig (the --sources file's `allocation:`)

What is not a setting stays an argument: where a tier listens and whom it talks to (host, port, URLs, links),
the package, the sources file, and every secret (tokens, token files). So a saved file holds no secret, and
with the same package and arguments it re-creates the deployment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dimec.config import (
    SERVE_PRECISIONS,
    add_options,
    at_least,
    build_section,
    describe_section,
    device_problem,
    one_of,
    option_flag,
    optional,
    options_section,
    read_config_file,
    setting,
)
from dimec.errors import ConfigError
from dimec.serving.deploy.web import DEMO_SECTION, WebConfig
from dimec.serving.live.controller import LIVE_SECTION, LiveSettings
from dimec.serving.phone.remote import TIMEOUTS_SECTION, Timeouts
from dimec.serving.phone.settings import MOBILE_SECTION, FleetClientSettings, MobileSettings
from dimec.serving.phone.settings import SECTION as CLIENT_SECTION
from dimec.serving.servers.batcher import BATCHING_SECTION, BatchingConfig
from dimec.serving.servers.server import LIMITS_SECTION, Limits
from dimec.serving.servers.sources import AllocationConfig, SchedulingConfig

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SERVER_SECTION = "server"
SCHEMA = 1  # the saved file's format: {"schema", "dimec_version", "command", "sections": {name: {key: value}}}


@dataclass
class ServerSettings:
    """How `dimec serve` runs its tier (its process, model and log); the demo's servers take threads too."""

    threads: int | None = setting(None, "torch intra-op threads (null: torch's choice)", optional(at_least(1)))
    device: str = setting("auto", "where the tier's model runs: auto (CUDA, else Apple MPS, else CPU), cpu, cuda, "
                                  "cuda:N, mps", device_problem)
    precision: str = setting("auto", "the model's weights and compute: auto (bf16 on a GPU that has it, fp16 on an "
                                     "older GPU, fp32 on CPU), fp32, bf16, fp16 (GPU only)", one_of(*SERVE_PRECISIONS))
    dynamic_batching: bool = setting(False, "dynamic batching: concurrent requests share forward passes "
                                            "(its sizes: server.batching)")
    log_level: str = setting("warning", "the HTTP server's log level", one_of(*LOG_LEVELS))


SECTIONS: dict[str, type] = {
    SERVER_SECTION: ServerSettings, LIMITS_SECTION: Limits, BATCHING_SECTION: BatchingConfig,
    LIVE_SECTION: LiveSettings, CLIENT_SECTION: FleetClientSettings, MOBILE_SECTION: MobileSettings,
    TIMEOUTS_SECTION: Timeouts, DEMO_SECTION: WebConfig,
    "sources.scheduling": SchedulingConfig, "sources.allocation": AllocationConfig,
}
COMMANDS = {  # the sections each command saves and reads back (--settings)
    "serve": (SERVER_SECTION, LIMITS_SECTION, BATCHING_SECTION, LIVE_SECTION),
    "client": (CLIENT_SECTION, MOBILE_SECTION, TIMEOUTS_SECTION, LIVE_SECTION),
}


# ---- command-line options: which fields of which section, under which flag (today's names) ---------------------
@dataclass(frozen=True)
class Options:
    section: str
    names: tuple[str, ...] | None = None  # None: every field
    flags: tuple[tuple[str, str], ...] = ()  # (field, flag) where the flag is not option_flag(field)

    def flag(self, name: str) -> str:
        return dict(self.flags).get(name, option_flag(name))


OPTIONS = {
    SERVER_SECTION: Options(SERVER_SECTION, flags=(("dynamic_batching", "--batching"),)),
    LIMITS_SECTION: Options(LIMITS_SECTION),
    BATCHING_SECTION: Options(BATCHING_SECTION, flags=(("max_batch", "--batch-max"), ("max_wait_ms", "--batch-wait-ms"),
                                                       ("max_queue", "--batch-queue"))),
    LIVE_SECTION: Options(LIVE_SECTION, ("shadow_rate", "feedback_rate")),  # live/cli.py adds them
    CLIENT_SECTION: Options(CLIENT_SECTION, ("private", "trusted", "max_latency_ms", "latency_profile", "cloud_budget",
                                             "budget_window", "cloud_price", "min_mobile_confidence")),
    MOBILE_SECTION: Options(MOBILE_SECTION),
    TIMEOUTS_SECTION: Options(TIMEOUTS_SECTION, flags=(("connect_s", "--connect-timeout"), ("read_s", "--timeout"),
                                                       ("total_s", "--call-timeout"))),
    DEMO_SECTION: Options(DEMO_SECTION, ("token_ttl_s",), (("token_ttl_s", "--token-ttl"),)),
}


def add_section_options(parser: Any, section: str, names: tuple[str, ...] | None = None) -> None:
    """The options of one section (or of `names` in it), generated from its declaration (config.add_options)."""
    spec = OPTIONS[section]
    add_options(parser, SECTIONS[section], names or spec.names, spec.flag)


def section_from_args(section: str, args: Any, base: Any = None, names: tuple[str, ...] | None = None) -> Any:
    """One section: `base` (from --settings, else the defaults) with the options given over it, checked."""
    spec = OPTIONS[section]
    return options_section(SECTIONS[section], args, f"{section}.", base, names or spec.names, spec.flag)


# ---- saved settings: beside the package, read back with --settings --------------------------------------------
def settings_path(package: str | Path) -> Path:
    """`<export folder>/<tier>.settings.json`: beside the package, not in it (its manifest lists every file)."""
    package = Path(package)
    return package.parent / f"{package.name}.settings.json"


def to_json(sections: dict[str, Any]) -> dict[str, Any]:
    """{name: {key: value}} of built sections, as saved and as /healthz shows them (JSON types only)."""
    return {name: json.loads(json.dumps(asdict(value))) for name, value in sections.items()}


def save_settings(package: str | Path, command: str, sections: dict[str, Any],
                  warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path | None:
    """Write the checked sections beside the package; a folder that cannot be written is one warning, never a
    failure (a read-only export must still be servable)."""
    from dimec import __version__
    from dimec.atomic import write_json

    path = settings_path(package)
    body = {"schema": SCHEMA, "dimec_version": __version__, "command": command, "sections": to_json(sections)}
    try:
        write_json(path, body)
    except OSError as exc:
        warn(f"dimec: warning: cannot save the settings to {path} ({exc.strerror or exc}); serving without them")
        return None
    return path


def read_settings(path: str | Path, command: str) -> dict[str, Any]:
    """{section: built and checked section} from a saved (or hand-written YAML/JSON) settings file; a section or
    key this command does not know is an error, and so is every bad value (all reported at once)."""
    raw = read_config_file(path)
    sections = raw["sections"] if "sections" in raw else raw  # a saved file, or a hand-written mapping of sections
    if not isinstance(sections, dict):
        raise ConfigError(f"{path}: 'sections' must be a mapping of settings sections, got {sections!r}"[:200])
    known = COMMANDS[command]
    unknown = [name for name in sections if name not in known]
    if unknown:
        raise ConfigError(f"{path}: unknown settings section(s) {', '.join(map(str, unknown))} for dimec {command}",
                          f"its sections: {', '.join(known)} (`dimec settings` lists their keys)")
    problems, out = [], {}
    for name, values in sections.items():
        try:
            out[name] = build_section(SECTIONS[name], values, f"{name}.")
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems), "`dimec settings` lists every setting and its range",
                          problems)
    return out


def describe() -> list[dict[str, Any]]:
    """`dimec settings`' rows of every serving section."""
    return [row for name, cls in SECTIONS.items() for row in describe_section(name, cls)]

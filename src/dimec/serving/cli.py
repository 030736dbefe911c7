"""`dimec export | serve | serve-all | demo | client | profile` (attached by dimec.cli when this package is present)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dimec.cli_helpers import texts_from_args
from dimec.config import build_section, raise_problems
from dimec.errors import ConfigError
from dimec.serving import settings as st
from dimec.serving.fleet_cli import add_fleet_client_args, attach_fleet_commands
from dimec.serving.live import cli as live_cli

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORTS = {"edge": 8101, "cloud": 8102}
SETTINGS_HINT = "fix them with the option or in the --settings file; `dimec settings SECTION` lists every setting"


# ---- argument types of what is not a setting (ports, counts of export and profile): one line, exit 2 --------
def _bounded(kind: type, low: float, high: float | None = None, what: str = "") -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value != value or value < low or (high is not None and value > high):  # value != value: NaN
            bounds = f"in {low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what or 'it'} must be {bounds}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


PORT = _bounded(int, 1, 65535, "a TCP port")
POSITIVE_INT = _bounded(int, 1)


def attach_serving_commands(sub) -> None:
    p = sub.add_parser("export", help="write one package per tier (the mobile one: one int8 ONNX graph)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/packages)")
    p.add_argument("--full", action="store_true",
                   help="also ship the mobile tier's fp32 ONNX graph and PyTorch weights (for comparisons)")
    p.add_argument("--no-onnx", action="store_true", help="mobile package with PyTorch weights, no ONNX graph")
    p.add_argument("--texts-file", help="texts (one per line) for the ONNX check (default: validation split)")
    p.add_argument("--check-limit", type=POSITIVE_INT, default=500, help="at most this many texts for the ONNX check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve the edge or cloud tier over HTTP (bearer token required)")
    p.add_argument("tier", choices=("edge", "cloud"))
    p.add_argument("path", help="the tier's package, or a run directory (its package is exported if missing)")
    _token_args(p, "bearer token clients must send")
    p.add_argument("--port", type=PORT, help="default: 8101 for edge, 8102 for cloud")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--sources", help="YAML/JSON file: tokens -> sources and priority classes, scheduling and "
                                     "allocation settings (docs/fleet.md); replaces --token")
    p.add_argument("--cloud-url", help="edge only: the cloud tier that plans going on to the cloud are forwarded to")
    p.add_argument("--cloud-token", help="bearer token for --cloud-url (default: env DIMEC_CLOUD_TOKEN, else this "
                                         "server's token). Visible in `ps`: prefer --cloud-token-file or the env")
    p.add_argument("--cloud-token-file", help="file whose first line is the --cloud-token (not visible in `ps`)")
    p.add_argument("--metrics-token-file", help="file whose first line is the token /metrics and "
                                                "/v1/drift/reference then need (default: env DIMEC_METRICS_TOKEN; "
                                                "unset: they are open, as on loopback; docs/serving.md)")
    p.add_argument("--link-cloud", help="edge only: emulated edge->cloud link, e.g. 'wan' or 'latency=30'")
    live_cli.add_server_args(p)
    _settings_arg(p, "serve")
    g = p.add_argument_group("settings (`dimec settings server`)")
    st.add_section_options(g, st.SERVER_SECTION)
    st.add_section_options(g, st.LIMITS_SECTION)
    st.add_section_options(g, st.BATCHING_SECTION)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-all", help="local three-tier demo: edge and cloud servers + the mobile client")
    p.add_argument("run_dir")
    _client_args(p)
    _threads_arg(p)
    p.set_defaults(func=cmd_serve_all)

    p = sub.add_parser("demo", help="the mobile tier in the browser: demo page and fleet dashboard on loopback, "
                                    "beside edge and cloud servers (docs/web.md)")
    p.add_argument("run_dir", help="a run directory (its packages are exported if missing) or an export folder")
    p.add_argument("--port", type=PORT, default=8100, help="the page's port (default 8100)")
    p.add_argument("--host", default="127.0.0.1", choices=LOOPBACK_HOSTS, help="loopback only")
    st.add_section_options(p, st.DEMO_SECTION)
    _threads_arg(p)
    p.add_argument("--web-dist", help="the built page (default: web/dist of this source tree)")
    st.add_section_options(p, st.SERVER_SECTION, ("log_level",))
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("client", help="the mobile client: route texts, answer locally or offload")
    p.add_argument("path", help="the mobile package, or a run directory")
    p.add_argument("--edge-url")
    p.add_argument("--cloud-url")
    _token_args(p, "bearer token")
    _client_args(p)
    live_cli.add_client_args(p)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("profile", help="measure tiers and links; write the cost profile (ms) for calibrate")
    p.add_argument("run_dir")
    p.add_argument("--edge-url", help="default: start a local edge server")
    p.add_argument("--cloud-url", help="default: start a local cloud server")
    _token_args(p, "bearer token for given servers")
    p.add_argument("--backend", default="onnx-int8", choices=("onnx-int8", "onnx", "torch"))
    p.add_argument("--samples", type=POSITIVE_INT, default=50)
    p.add_argument("--link-edge", help="emulated link, e.g. 'wifi' or 'latency=20,jitter=5,bandwidth=50,loss=0'")
    p.add_argument("--link-cloud", help="emulated link, e.g. '4g' or 'latency=80,bandwidth=20'")
    p.add_argument("--out", help="profile path (default RUN_DIR/profile.json)")
    p.set_defaults(func=cmd_profile)

    attach_fleet_commands(sub)  # plan, monitor (fleet_cli.py)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="texts to classify (none: read lines from stdin)")
    p.add_argument("--file", help="a text file, one text per line")
    p.add_argument("--link-edge", help="emulated mobile->edge link, e.g. 'wifi' or 'latency=20,jitter=5,bandwidth=50'")
    p.add_argument("--link-cloud", help="emulated mobile->cloud link, e.g. '4g' or 'latency=80,loss=0.01'")
    _settings_arg(p, "client")
    g = p.add_argument_group("settings (`dimec settings client`)")
    st.add_section_options(g, st.MOBILE_SECTION)
    st.add_section_options(g, st.TIMEOUTS_SECTION)
    add_fleet_client_args(p)


def _settings_arg(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--settings", metavar="FILE",
                   help=f"YAML/JSON settings ({', '.join(st.COMMANDS[command])}), e.g. the <tier>.settings.json "
                        "saved beside the package by an earlier run; options given here override it")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    """serve-all and demo start several servers on one machine: one torch thread each unless told otherwise."""
    p.add_argument("--threads", type=int, default=1, help="torch threads per server process (default 1)")


def _checked_threads(args) -> int:
    try:  # the declaration's check (server.threads), with this command's own default of 1
        return build_section(st.ServerSettings, {"threads": args.threads}, f"{st.SERVER_SECTION}.").threads
    except ConfigError as exc:
        raise_problems(exc.problems, SETTINGS_HINT)
        raise


def command_settings(command: str, args) -> dict[str, Any]:
    """The command's sections: the --settings file's (else the declared defaults) with the options given on the
    command line over them. Options default to None ("not given", config.add_options), which is how an
    explicit option wins over the file while an absent one leaves the file's value. Every section is checked
    (config.build_section); the problems of all of them are one ConfigError (exit 2), before anything loads."""
    saved = st.read_settings(args.settings, command) if getattr(args, "settings", None) else {}
    sections, problems = {}, []
    for name in st.COMMANDS[command]:
        try:
            if name == st.LIVE_SECTION:
                sections[name] = live_cli.settings_from_args(args, saved.get(name))
            else:
                sections[name] = st.section_from_args(name, args, saved.get(name))
        except ConfigError as exc:
            problems += exc.problems
    if getattr(args, "ignore_advice", False) and not problems:
        sections[st.CLIENT_SECTION] = dataclasses.replace(sections[st.CLIENT_SECTION], honour_advice=False)
    if problems:
        raise_problems(problems, SETTINGS_HINT)
    return sections


def _token_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--token", help=f"{what} (default: --token-file, else env DIMEC_TOKEN). A token on the command "
                                   "line is visible to every user of this machine in `ps`: prefer the file or the "
                                   "environment")
    p.add_argument("--token-file", help="file whose first line is the token (keep it mode 600)")


def _secret(value: str | None, path: str | None, env: str) -> str | None:
    """A token from the option, else the first line of its file, else the environment; None if none is set."""
    if value:
        return value
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {path} ({exc})") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"the token file {path} is empty", "write the token on its first line")
        return lines[0].strip()
    return os.environ.get(env) or None


def _token(args) -> str | None:
    return _secret(getattr(args, "token", None), getattr(args, "token_file", None), "DIMEC_TOKEN")


def _links(args) -> dict:
    from dimec.serving.phone.links import LinkProfile

    return {"edge": LinkProfile.parse(args.link_edge), "cloud": LinkProfile.parse(args.link_cloud)}


def _texts(args) -> list[str] | None:
    return texts_from_args(args.texts, args.file) or None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- commands -----------------------------------------------------------------------------------------------
def cmd_export(args) -> None:
    from dimec.serving.deploy.export import export_packages
    from dimec.textinput import read_lines

    texts = read_lines(args.texts_file) if args.texts_file else None
    export_packages(args.run_dir, args.out, onnx=not args.no_onnx, full=args.full, check_texts=texts,
                    check_limit=args.check_limit, log=print)


def cmd_serve(args) -> None:
    from dimec.serving.deploy.export import ensure_package
    from dimec.serving.servers.server import create_app
    from dimec.serving.servers.sources import SourceTable

    sections = command_settings("serve", args)  # every setting checked before anything else happens
    server = sections[st.SERVER_SECTION]
    token = _token(args)
    sources = SourceTable.load(args.sources) if getattr(args, "sources", None) else None
    if not token and sources is None:
        raise ConfigError("no bearer token", "pass --token T or set DIMEC_TOKEN (the same value on every tier), "
                                             "or --sources FILE")
    if server.threads:
        import torch

        torch.set_num_threads(server.threads)
    metrics_token = _secret(None, args.metrics_token_file, "DIMEC_METRICS_TOKEN")
    if args.host not in LOOPBACK_HOSTS:
        print(f"dimec: warning: binding {args.host}: plain HTTP, put TLS in front of it beyond a trusted network",
              file=sys.stderr)
        if not metrics_token:
            print("dimec: warning: /metrics (source names and their traffic) and /v1/drift/reference are open to "
                  "anyone who reaches this address; set DIMEC_METRICS_TOKEN or --metrics-token-file",
                  file=sys.stderr)
    forward = None
    if args.cloud_url:
        if args.tier != "edge":
            raise ConfigError("--cloud-url is for the edge (it forwards plans that go on to the cloud)")
        from dimec.serving.phone.links import LinkProfile
        from dimec.serving.phone.remote import HttpRemote

        args.cloud_token = _secret(args.cloud_token, args.cloud_token_file, "DIMEC_CLOUD_TOKEN")
        if not (args.cloud_token or token):  # with --sources there is no token of its own to lend the link
            raise ConfigError("--cloud-url needs --cloud-token (or DIMEC_CLOUD_TOKEN) when the edge runs with "
                              "--sources", "give the token of a source the cloud accepts (docs/fleet.md)")
        forward = HttpRemote("cloud", args.cloud_url, args.cloud_token or token, link=LinkProfile.parse(args.link_cloud))
        problem = forward.probe()  # a wrong token refuses the start; an unreachable cloud is only a warning
        if problem:
            print(f"dimec: warning: {problem}; plans going on to the cloud are answered here (fallback) until it "
                  "answers", file=sys.stderr)
    from dimec.devices import resolve_device, resolve_serving_precision
    from dimec.runtime.tier import TierModel

    device = resolve_device(server.device, "--device")  # a missing GPU: one error before anything starts
    precision = resolve_serving_precision(server.precision, device)
    batching = sections[st.BATCHING_SECTION] if server.dynamic_batching else None
    port = args.port or DEFAULT_PORTS[args.tier]
    sock = bind_port(args.host, port)  # before the model loads: a taken port fails fast, and no other
    try:                               # server can take it between this check and serving
        live = live_cli.live_from_args(args, sections[st.LIVE_SECTION])  # --live RUN_DIR: shadows, feedback, policy
        package = ensure_package(args.path, args.tier, log=_say)
        model = TierModel(package, device=str(device), precision=precision)
        app = create_app(None, args.tier, token, sections[st.LIMITS_SECTION], model=model, sources=sources,
                         forward=forward, batching=batching, live=live, metrics_token=metrics_token,
                         settings=st.to_json(sections))  # shown by /healthz
        saved = st.save_settings(package, "serve", sections)
        if saved:
            _say(f"settings saved to {saved} (re-read with --settings)")
        print(f"dimec {args.tier} tier on http://{_url_host(args.host)}:{port} "
              f"(exit layer {model.exit_layer}, {device} {precision}"
              f"{f', batching {batching.max_batch} texts / {batching.max_wait_ms:g} ms' if batching else ''})",
              flush=True)
        run_server(app, sock, server.log_level)
    finally:
        sock.close()


def bind_port(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ConfigError saying why not (in use, not an address here...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot bind {host!r}: {exc.strerror}", "give --host an IP address or host name "
                                                                   "of this machine") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; one in use is not
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use",
                              "stop the other server or pick another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          "ports below 1024 need privileges; --host must be an address of this machine") from None
    sock.setblocking(False)
    return sock


def run_server(app, sock: socket.socket, log_level: str) -> None:
    """uvicorn on an already bound socket (tests replace this function)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _client(args, mobile_path, edge_url, cloud_url, token, sections: dict[str, Any]):
    from dimec.serving.deploy.export import ensure_package
    from dimec.serving.phone.client import MobileClient

    fleet = sections[st.CLIENT_SECTION].policy()  # constraints, budget, advice
    mobile = sections[st.MOBILE_SECTION]
    package = ensure_package(mobile_path, "mobile", mobile.backend, log=_say)
    saved = st.save_settings(package, "client", sections)
    if saved:
        _say(f"settings saved to {saved} (re-read with --settings)")
    return MobileClient(package, edge_url, cloud_url, token, sections[st.TIMEOUTS_SECTION], mobile.retries,
                        _links(args), mobile.backend, mobile.routing, fleet=fleet)


def _run_client(client, texts: list[str] | None) -> None:
    """Answer the given texts, or read texts from stdin until EOF; one JSON line per answer."""
    if texts:
        for text, answer in zip(texts, client.classify(texts), strict=True):
            print(json.dumps({"text": text, **answer.to_dict()}))
    else:
        interactive = sys.stdin.isatty()
        if interactive:
            print("type a text and press enter (Ctrl-D to quit)", file=sys.stderr)
        from dimec.textinput import iter_lines

        for line in iter_lines(sys.stdin.buffer, "stdin"):  # checked as UTF-8, line by line
            answer = client.classify([line.strip()])[0]
            print(json.dumps({"text": line.strip(), **answer.to_dict()}), flush=True)
    print(f"stats: {json.dumps(client.stats())}", file=sys.stderr)


def cmd_client(args) -> None:
    sections = command_settings("client", args)  # every setting checked before anything loads
    if not (args.edge_url or args.cloud_url) and sections[st.MOBILE_SECTION].routing != "mobile-only":
        raise ConfigError("no remote tier", "give --edge-url and/or --cloud-url (or --routing mobile-only)")
    with _client(args, args.path, args.edge_url, args.cloud_url, _token(args), sections) as client:
        live_cli.attach_client(client, args, args.cloud_url, _token(args),  # shadow sample, policy follower
                               sections[st.LIVE_SECTION])
        _run_client(client, _texts(args))


def cmd_serve_all(args) -> None:
    from dimec.serving.deploy.export import ensure_package
    from dimec.serving.deploy.local import ProcessServer

    sections, threads = command_settings("client", args), _checked_threads(args)
    token = os.environ.get("DIMEC_TOKEN") or secrets.token_urlsafe(24)  # private to this demo
    texts = _texts(args)
    cloud = ProcessServer("cloud", ensure_package(args.run_dir, "cloud", log=_say), token, threads=threads)
    edge = ProcessServer("edge", ensure_package(args.run_dir, "edge", log=_say), token, threads=threads,
                         extra_args=["--cloud-url", cloud.url])  # the edge forwards plans going on to the cloud
    servers = [edge, cloud]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
            print(f"{server.tier} tier up on {server.url}", file=sys.stderr)
        with _client(args, args.run_dir, edge.url, cloud.url, token, sections) as client:
            _run_client(client, texts)
    finally:
        for server in servers:
            server.stop()
        print("servers stopped", file=sys.stderr)


def cmd_demo(args) -> None:
    from dimec.serving.deploy.export import ensure_package
    from dimec.serving.deploy.local import ProcessServer
    from dimec.serving.deploy.web import create_web_app

    try:  # checked before anything starts
        web = st.section_from_args(st.DEMO_SECTION, args)
        log_level = st.section_from_args(st.SERVER_SECTION, args, names=("log_level",)).log_level
        threads = _checked_threads(args)
    except ConfigError as exc:
        raise_problems(exc.problems, SETTINGS_HINT)
    token = os.environ.get("DIMEC_TOKEN") or secrets.token_urlsafe(24)  # the tiers' token: never sent to the page
    mobile = ensure_package(args.run_dir, "mobile", "onnx-int8", log=_say)
    sock = bind_port(args.host, args.port)
    cloud = ProcessServer("cloud", ensure_package(args.run_dir, "cloud", log=_say), token, threads=threads)
    edge = ProcessServer("edge", ensure_package(args.run_dir, "edge", log=_say), token, threads=threads,
                         extra_args=["--cloud-url", cloud.url])
    servers = [edge, cloud]
    try:
        app = create_web_app(mobile, {"edge": edge.url, "cloud": cloud.url}, token, args.web_dist, web)
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
            _say(f"{server.tier} tier up on {server.url}")
        page = f"http://{_url_host(args.host)}:{args.port}"
        print(f"demo page: {page}/   fleet dashboard: {page}/dashboard   (Ctrl-C stops everything)", flush=True)
        run_server(app, sock, log_level)
    finally:
        sock.close()
        for server in servers:
            server.stop()


def cmd_profile(args) -> None:
    from dimec.rundir import RunDir
    from dimec.serving.ops.profile import profile_run

    out = Path(args.out) if args.out else RunDir(args.run_dir).profile
    profile = profile_run(args.run_dir, args.edge_url, args.cloud_url, _token(args), args.backend, args.samples,
                          _links(args), out, log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(profile, indent=2))
    print(f"wrote {out}; use it with `dimec calibrate {args.run_dir} --set cost.profile={out}`", file=sys.stderr)

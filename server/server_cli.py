"""``fedct server``: run the aggregation side of a federation (Flower SuperLink + FedCT run)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        type=Path,
        required=True,
        help="server state folder (SuperLink database, checkpoints, metrics); reuse it to resume",
    )
    parser.add_argument(
        "--certs",
        type=Path,
        help="the folder `fedct certs` wrote (CA, server certificate, hospital public keys)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no SuperNode authentication (only for tests on a trusted network)",
    )
    parser.add_argument(
        "--host", default="0.0.0.0", help="the hospitals' address to listen on (default all)"
    )
    parser.add_argument("--port", type=int, default=8000, help="the hospitals' port (default 8000)")
    parser.add_argument(
        "--superlink-port",
        type=int,
        default=0,
        help="the SuperLink's own port on 127.0.0.1, behind nginx (default: any free port)",
    )
    parser.add_argument(
        "--no-proxy",
        action="store_true",
        help="no nginx: the SuperLink itself listens on --host/--port, with Flower's Control "
        "and Runtime APIs (which authenticate nobody) open there too",
    )
    parser.add_argument("--rounds", type=int, help="federated rounds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any run-config key (README: Configuration reference), e.g. --set min-sites=3",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the SuperLink up after the run completes (until Ctrl-C)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedct.common.config import parse_overrides
    from fedct.common.errors import ConfigError
    from fedct.server.certs import CertPaths
    from fedct.server.deploy import ServerSettings, serve

    if args.insecure == (args.certs is not None):
        raise ConfigError(
            "give --certs DIR (from `fedct certs`) for TLS and hospital authentication, "
            "or --insecure for a test on a trusted network"
        )
    if args.insecure:
        log.warning(
            "running WITHOUT TLS and WITHOUT SuperNode authentication: model updates travel "
            "unencrypted and any machine that reaches port %d can join. Use only for tests.",
            args.port,
        )
    overrides = parse_overrides(args.set)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if "output-dir" in overrides or "data-root" in overrides:
        raise ConfigError("output-dir and data-root are set by fedct server (use --state)")
    settings = ServerSettings(
        state_dir=args.state.resolve(),
        certs=CertPaths(args.certs.resolve()) if args.certs else None,
        host=args.host,
        port=args.port,
        run_config=overrides,
        proxy=not args.no_proxy,
        superlink_port=args.superlink_port,
    )
    console = Console(stderr=True)
    serve(settings, console, keep_running=args.keep_running)
    console.print(f"final global model: {settings.run_dir / 'final_model.safetensors'}")
    return 0

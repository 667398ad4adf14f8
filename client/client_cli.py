"""``fedct client``: join a federation from a hospital (a Flower SuperNode with FedCT)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", required=True, help="this hospital's name (as in `fedct certs`)")
    parser.add_argument("--data", type=Path, required=True, help="the hospital's DICOM folder")
    parser.add_argument(
        "--state",
        type=Path,
        required=True,
        help="this site's state folder: privacy ledger and frame cache (keep it; never share it)",
    )
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, help="this hospital's authentication key (NAME.key)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no authentication (only for tests on a trusted network)",
    )
    parser.add_argument(
        "--epsilon", type=float, default=8.0, help="this site's privacy budget ε (default 8)"
    )
    parser.add_argument(
        "--delta", type=float, default=0.0, help="δ (default: below 1/N for N training patients)"
    )
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=9094,
        help="local port for this SuperNode's app processes (default 9094; one per SuperNode)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="run Flower's own flower-supernode, and each task in a fresh flwr-clientapp "
        "process (no warm executor, no paced waits and no bundle check before Flower loads "
        "the app)",
    )
    parser.add_argument(
        "--retry-wait",
        type=float,
        default=15.0,
        help="seconds between tries while the server cannot be reached (default 15)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedct.client.node import NodeSettings, check_site, run_node
    from fedct.common.config import SiteConfig
    from fedct.common.errors import ConfigError

    secure = args.ca is not None or args.key is not None
    if args.insecure == secure or (secure and (args.ca is None or args.key is None)):
        raise ConfigError(
            "give --ca ca.crt and --key NAME.key (from the federation's `fedct certs`), "
            "or --insecure for a test on a trusted network"
        )
    for path in (args.ca, args.key):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path} does not exist")
    if args.insecure:
        log.warning(
            "joining WITHOUT TLS and WITHOUT authentication: model updates travel unencrypted. "
            "Use only for tests."
        )
    site = SiteConfig(
        site_name=args.site,
        data_dir=str(args.data.resolve()),
        state_dir=str(args.state.resolve()),
        epsilon=args.epsilon,
        delta=args.delta,
        dp=not args.no_dp,
    )
    settings = NodeSettings(
        site, args.superlink, args.ca, args.key, args.runtime_port, warm=not args.cold
    )
    log.info("checking %s before joining ...", args.data)
    log.info("site %s: %s", args.site, check_site(settings))
    log.info("connecting to %s", args.superlink)
    return run_node(settings, retry_wait_s=args.retry_wait)

"""``fedct certs``: the federation's CA, the SuperLink certificate, one key pair per hospital."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write (or complete)")
    parser.add_argument(
        "--hospital",
        action="append",
        default=[],
        metavar="NAME",
        help="a hospital to create an authentication key pair for (repeat for each)",
    )
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="HOST",
        help="DNS name or IP address hospitals use to reach the server (repeat; "
        "localhost and 127.0.0.1 are always included)",
    )
    parser.add_argument("--days", type=int, default=825, help="certificate validity (days)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedct.server.certs import CertPaths, create, server_names_of

    paths = CertPaths(args.out.resolve())
    written = create(paths.folder, args.hospital, args.server_name, days=args.days)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"nothing to do: {paths.folder} already has everything asked for")
    print(
        f"\nServer certificate valid for: {', '.join(server_names_of(paths.server_cert))}\n"
        f"Keep {paths.ca_key} offline; it only signs certificates.\n\n"
        f"On the server:  fedct server --state STATE_DIR --certs {paths.folder}\n"
        "  (registers every hospitals/*.pub key with the SuperLink before the run)\n"
    )
    for name in paths.hospitals():
        print(
            f"Give hospital {name}: {paths.ca_cert} and {paths.hospital_key(name)} "
            "(by a secure channel); it runs:\n"
            f"  fedct client --site {name} --data DATA_DIR --state STATE_DIR "
            f"--superlink SERVER:8000 --ca ca.crt --key {name}.key"
        )
    return 0

"""The ``fedct`` command: a small dispatcher over subcommands owned by each package.

Every subcommand lives in a light module (argparse only) that exposes ``configure(parser)``;
``configure`` registers the arguments and sets ``handler``, which imports the heavy code (torch,
pydicom, Flower) only when it runs. Only the module of the chosen subcommand is imported, so
``fedct --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedct.common.errors import FedCTError
from fedct.common.logs import configure_logging
from fedct.common.processes import interruptible
from fedct.common.version import FEDCT_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """A leaf subcommand: ``path`` is e.g. ``("data", "inspect")``."""

    path: tuple[str, ...]
    module: str
    help: str


# One-line descriptions of command groups (commands with sub-commands of their own).
GROUPS: dict[str, str] = {
    "data": "Check a hospital's DICOM folder, or write synthetic hospitals.",
    "privacy": "A site's privacy budget: what was spent, round by round.",
    "audit": "A state folder's hash-chained audit log.",
}

COMMANDS: tuple[Command, ...] = (
    Command(
        ("data", "inspect"),
        "fedct.common.data_cli",
        "Report what FedCT finds in a hospital's DICOM folder, and every skipped file.",
    ),
    Command(
        ("data", "synth"),
        "fedct.simulations.synth_cli",
        "Write synthetic hospitals of real DICOM CT series (for simulations and tests).",
    ),
    Command(
        ("privacy", "report"),
        "fedct.client.privacy_cli",
        "Print a site's privacy ledger and the budget it has left.",
    ),
    Command(
        ("audit", "verify"),
        "fedct.common.audit_cli",
        "Check a state folder's audit log (edited, removed or cut-off records) and summarize it.",
    ),
    Command(
        ("certs",),
        "fedct.server.certs_cli",
        "Create the federation's CA, the server certificate and each hospital's key pair.",
    ),
    Command(
        ("pretrain",),
        "fedct.server.pretrain_cli",
        "Train the federation's starting weights on public (non-hospital) CT data.",
    ),
    Command(
        ("server",),
        "fedct.server.server_cli",
        "Run the aggregation server (Flower SuperLink with TLS) and the FedCT run on it.",
    ),
    Command(
        ("client",),
        "fedct.client.client_cli",
        "Join a federation from a hospital: check its data, then start a Flower SuperNode.",
    ),
    Command(
        ("explain",),
        "fedct.common.explain_cli",
        "Predict and show Grad-CAM overlays for a DICOM file or series, with a FedCT model.",
    ),
    Command(
        ("simulate",),
        "fedct.simulations.simulate_cli",
        "Simulate a multi-hospital federation on this machine and write a report.",
    ),
)


def _chosen(argv: Sequence[str]) -> tuple[str, ...]:
    """The command path named in ``argv`` (skipping options), longest match first."""
    words = [a for a in argv if not a.startswith("-")]
    for command in COMMANDS:
        if tuple(words[: len(command.path)]) == command.path:
            return command.path
    return ()


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedct",
        description="FedCT: federated, differentially private CT diagnosis across hospitals.",
    )
    parser.add_argument("--version", action="version", version=f"fedct {FEDCT_VERSION}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    noise.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    top = parser.add_subparsers(title="commands", metavar="COMMAND")

    chosen = _chosen(argv)
    subparsers: dict[tuple[str, ...], argparse._SubParsersAction] = {(): top}
    for command in COMMANDS:
        for depth in range(1, len(command.path) + 1):
            prefix = command.path[:depth]
            if prefix in subparsers or depth == len(command.path):
                continue
            group = subparsers[prefix[:-1]].add_parser(
                prefix[-1], help=GROUPS[prefix[-1]], description=GROUPS[prefix[-1]]
            )
            group.set_defaults(handler=_group_help(group))
            subparsers[prefix] = group.add_subparsers(title="commands", metavar="COMMAND")
        leaf = subparsers[command.path[:-1]].add_parser(
            command.path[-1], help=command.help, description=command.help
        )
        if command.path == chosen:
            importlib.import_module(command.module).configure(leaf)
    return parser


def _group_help(group: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(_: argparse.Namespace) -> int:
        group.print_help()
        return 2

    return show


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    configure_logging(-1 if args.quiet else args.verbose)
    interruptible()  # also when a shell started it in the background
    try:
        return int(handler(args))
    except FedCTError as err:
        # Expected, explained failures (bad input, exhausted budget...): one clear message.
        log.error("%s", err)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

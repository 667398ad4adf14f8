"""Child-process entry of ``fedct simulate``: run one Flower simulation and exit."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="fused run config, as JSON")
    parser.add_argument("--sites", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedct.common.logs import configure_logging
    from fedct.simulations.flower_sim import run_flower_simulation

    configure_logging(0)
    run_flower_simulation(json.loads(args.config), num_sites=args.sites, cpus=args.cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

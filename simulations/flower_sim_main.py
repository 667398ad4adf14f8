"""Child-process entry of ``fedct simulate``: run one Flower simulation and exit."""

from __future__ import annotations

import argparse
import json
import os
import sys


def gpu_share(device: str, num_sites: int) -> float:
    """Each simulated site's share of the GPUs (Ray's fractional ``num_gpus``): the visible
    GPUs split evenly, at most one each; none for ``device = cpu`` or without a GPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 0.0
    return min(1.0, torch.cuda.device_count() / max(num_sites, 1))


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
    config = json.loads(args.config)
    run_flower_simulation(
        config,
        num_sites=args.sites,
        cpus=args.cpus,
        gpus_per_site=gpu_share(str(config.get("device", "auto")), args.sites),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

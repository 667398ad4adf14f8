"""Run FedCT's own ServerApp and ClientApp in Flower's simulation engine, in this process.

Flower's public ``run_simulation`` cannot pass a run config, which FedCT's apps read; this calls
the function behind it (as Flower's ``flwr-simulation`` process does) with the fused config:
FedCT's defaults plus this run's overrides. flwr is pinned, so this private entry is stable
for us; the e2e test catches a change.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from fedct.client.client_app import app as client_app
from fedct.common.app_bundle import write_app
from fedct.server.server_app import app as server_app

log = logging.getLogger(__name__)


def run_flower_simulation(
    run_config: dict[str, Any],
    *,
    num_sites: int,
    cpus: int,
    cpus_per_site: float = 1.0,
    gpus_per_site: float = 0.0,
) -> None:
    """Run the federation described by ``run_config`` with ``num_sites`` simulated sites."""
    run_id = random.SystemRandom().getrandbits(63)
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = random.SystemRandom().getrandbits(63)
    run.federation_id = NOOP_FEDERATION_ID
    # what Flower's own run_simulation does when it creates the run itself
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,  # type: ignore[arg-type]
        server_app_context=context,
        app_dir=str(write_app(Path(str(run_config["output-dir"])) / "flower-app")),
        is_app=True,  # sites fuse pyproject defaults with this run's overrides
        run=run,
    )

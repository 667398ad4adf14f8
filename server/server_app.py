"""The Flower ServerApp: FedCT's rounds on Flower's deployment or simulation engine.

Builds the first model (from ImageNet weights when configured), resumes from the newest
checkpoint when one exists, and hands the loop to the configured Flower strategy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedct.common.config import FederationConfig
from fedct.common.model_file import save_model
from fedct.common.models import build_model
from fedct.common.weights import model_weights
from fedct.server.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedct.server.strategy import make_strategy

    fed = FederationConfig.from_mapping(context.run_config)
    out = Path(fed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = model_weights(build_model(fed.model_config))
    resumed = CheckpointStore(out / "checkpoints").latest() if fed.resume else None
    state = None
    if resumed is not None:
        weights, state = resumed
        log.info("resuming from the checkpoint of round %d", state.round)
    done = state.round if state else 0
    if done >= fed.num_server_rounds:
        log.info("all %d rounds are already done (see %s)", fed.num_server_rounds, out)
        return
    strategy = make_strategy(fed, out, first_round=done + 1, state=state)
    result = strategy.start(  # type: ignore[attr-defined]
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
        num_rounds=fed.num_server_rounds - done,
        timeout=fed.round_timeout,
        train_config=ConfigRecord({"local-epochs": fed.local_epochs}),
        evaluate_fn=strategy.end_of_round,
    )
    final = (
        {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in result.arrays.items()}
        if result.arrays
        else weights
    )
    save_model(out / "final_model.safetensors", final, fed, stats=strategy.training_stats)
    log.info("final global model: %s", out / "final_model.safetensors")

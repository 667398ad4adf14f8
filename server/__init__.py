"""The aggregation side of FedCT: Flower ServerApp, strategies, checkpoints."""

"""The peer baseline (simulations/peer_recipe.py): FedAvg's weighted mean, and the true
cumulative ε of a fresh-engine-per-round recipe against FedCT's accountant and ledger.

Training uses a tiny GroupNorm CNN in place of ResNet-18 (per-sample gradients of 11 M
parameters take seconds a step on a CPU); the accounting does not depend on the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedct.client.privacy import Ledger, PrivacyBudget, epsilon_of
from fedct.client.training import sample_rate, steps_per_epoch
from fedct.simulations import peer_recipe
from fedct.simulations.peer_recipe import (
    PeerSite,
    fedavg,
    load_peer_data,
    run_peer,
    run_peer_centralized,
)
from tests.conftest import write_tiny_site


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[PeerSite]:
    root = tmp_path_factory.mktemp("peer-data")
    for index, name in enumerate(("hospital-a", "hospital-b")):
        write_tiny_site(root / name, index=index)
    return load_peer_data(root, image_size=16, seed=0)


@pytest.fixture(autouse=True)
def _tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def tiny(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )

    monkeypatch.setattr(peer_recipe, "peer_model", tiny)


def test_fedavg_is_the_mean_weighted_by_examples() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 8.0]), "n": torch.tensor(6)}
    out = fedavg([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([2.25, 7.0]))
    assert out["w"].dtype == torch.float32
    assert out["n"].item() == 5  # (2 + 18) / 4, integer buffers keep their dtype
    assert out["n"].dtype == torch.int64


def test_fedavg_refuses_mismatched_replies() -> None:
    with pytest.raises(ValueError, match="same keys"):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        fedavg([{"a": torch.zeros(1)}], [0])


def test_one_round_true_epsilon_is_what_the_fresh_engine_reports(sites: list[PeerSite]) -> None:
    result = run_peer(sites, rounds=1, seed=0)
    for site in sites:
        outcome = result.sites[site.name]
        n = len(site.train)
        assert outcome.steps == steps_per_epoch(n, 32)
        known = epsilon_of(
            [(1.0, sample_rate(n, 32), outcome.steps)], delta=site.delta, accountant="rdp"
        )
        assert outcome.true_epsilon == pytest.approx(known, rel=1e-9)
        assert outcome.reported_epsilon == pytest.approx((known,), rel=1e-9)


def test_three_rounds_compose_as_fedcts_ledger_does(sites: list[PeerSite], tmp_path: Path) -> None:
    rounds = 3
    result = run_peer(sites, rounds=rounds, seed=0)
    for site in sites:
        outcome = result.sites[site.name]
        q, per_round = sample_rate(len(site.train), 32), steps_per_epoch(len(site.train), 32)
        assert outcome.steps == per_round * rounds
        ledger = Ledger.open(tmp_path / site.name, PrivacyBudget(epsilon=1e3, delta=site.delta))
        for r in range(1, rounds + 1):
            ledger.record(
                round=r, noise_multiplier=1.0, sample_rate=q, steps=per_round, model_version="x"
            )
        assert outcome.true_epsilon == pytest.approx(ledger.spent_epsilon, rel=1e-9)
        assert outcome.true_epsilon == pytest.approx(
            epsilon_of([(1.0, q, per_round * rounds)], delta=site.delta, accountant="rdp"),
            rel=1e-9,
        )
        assert len(set(outcome.reported_epsilon)) == 1  # every fresh engine reports one round
        assert outcome.true_epsilon is not None
        assert outcome.true_epsilon > outcome.reported_epsilon[0]


def test_centralized_trains_the_pool_without_privacy(sites: list[PeerSite]) -> None:
    result = run_peer_centralized(sites, epochs=2, seed=0)
    pooled = sum(len(s.train) for s in sites)
    assert not result.dp
    for outcome in result.sites.values():
        assert outcome.steps == 2 * steps_per_epoch(pooled, 32)
        assert outcome.true_epsilon is None
        assert outcome.reported_epsilon == ()

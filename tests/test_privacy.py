from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedct.client.privacy import (
    BudgetExhaustedError,
    Ledger,
    LedgerError,
    PrivacyBudget,
    default_delta,
    epsilon_of,
)
from fedct.client.training import TrainConfig, train_local
from fedct.common.errors import ConfigError


def test_rdp_known_answer_from_opacus_tests() -> None:
    # Opacus' own accountant test: sigma=1.5, q=0.04, 90 epochs, delta=1e-5.
    eps = epsilon_of([(1.5, 0.04, int(90 / 0.04))], delta=1e-5, accountant="rdp")
    assert eps == pytest.approx(7.32911117143, abs=1e-8)


def test_ledger_reload_continues_the_same_budget(tmp_path: Path) -> None:
    budget = PrivacyBudget(epsilon=50.0, delta=1e-5)
    uninterrupted = Ledger.open(tmp_path / "a", budget)
    for r in range(1, 6):
        uninterrupted.record(
            round=r, noise_multiplier=1.5, sample_rate=0.04, steps=450, model_version=f"r{r}"
        )
    restarted = Ledger.open(tmp_path / "b", budget)
    for r in range(1, 4):
        restarted.record(
            round=r, noise_multiplier=1.5, sample_rate=0.04, steps=450, model_version=f"r{r}"
        )
    restarted = Ledger.open(tmp_path / "b", budget)  # a client restart
    assert restarted.last_round == 3
    for r in range(4, 6):
        restarted.record(
            round=r, noise_multiplier=1.5, sample_rate=0.04, steps=450, model_version=f"r{r}"
        )
    assert restarted.spent_epsilon == pytest.approx(uninterrupted.spent_epsilon, rel=1e-12)
    # 5 rounds of 450 steps are the known-answer run of 2250 steps
    assert restarted.spent_epsilon == pytest.approx(7.32911117143, abs=1e-8)


def test_budget_stop_triggers_exactly_after_planned_rounds(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, PrivacyBudget(epsilon=4.0, delta=1e-5))
    q, steps, planned = 0.05, 20, 6
    sigma = ledger.calibrate(sample_rate=q, steps_per_round=steps, planned_rounds=planned)
    for r in range(1, planned + 1):
        ledger.check(sigma, q, steps)
        ledger.record(
            round=r, noise_multiplier=sigma, sample_rate=q, steps=steps, model_version=str(r)
        )
    assert 3.9 <= ledger.spent_epsilon <= 4.0
    with pytest.raises(BudgetExhaustedError, match="privacy budget exhausted"):
        ledger.check(sigma, q, steps)
    # the calibrated sigma is kept across restarts, even if asked with other numbers
    again = Ledger.open(tmp_path, PrivacyBudget(epsilon=4.0, delta=1e-5))
    assert again.calibrate(sample_rate=0.5, steps_per_round=1, planned_rounds=1) == sigma


def test_raising_the_budget_is_a_site_setting(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, PrivacyBudget(epsilon=1.0, delta=1e-5))
    ledger.record(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=50, model_version="1")
    with pytest.raises(BudgetExhaustedError):
        ledger.check(1.0, 0.1, 50)
    raised = Ledger.open(tmp_path, PrivacyBudget(epsilon=10.0, delta=1e-5))
    assert raised.check(1.0, 0.1, 50) < 10.0


def test_corrupted_ledger_refuses(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))
    ledger.record(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10, model_version="1")
    data = json.loads(ledger.path.read_text())
    data["entries"][0]["epsilon"] = 0.0  # someone "resets" the budget by hand
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="corrupted"):
        Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))
    ledger.path.write_text("{truncated")
    with pytest.raises(LedgerError, match="corrupted"):
        Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))


def test_missing_but_expected_ledger_refuses(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="missing"):
        Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))


def test_budget_validation() -> None:
    with pytest.raises(ConfigError):
        PrivacyBudget(epsilon=0, delta=1e-5)
    with pytest.raises(ConfigError):
        PrivacyBudget(epsilon=1, delta=1e-5, accountant="moments")
    assert default_delta(1000) < 1 / 1000


def _delta_norm(before: dict[str, torch.Tensor], model: nn.Module) -> float:
    return float(
        torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    )


@pytest.mark.parametrize("clipping", ["bookkeeping", "hooks"])
@pytest.mark.parametrize("noise", [0.0, None])
def test_zero_noise_update_respects_clipping_bound(noise: float | None, clipping: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    data = TensorDataset(torch.randn(8, 1, 4, 4) * 100, torch.randint(0, 2, (8,)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip = 0.01
    cfg = TrainConfig(
        batch_size=8,
        physical_batch_size=8,
        learning_rate=1.0,
        momentum=0.0,
        max_grad_norm=clip,
        dp_clipping=clipping,
    )
    train_local(model, data, cfg, noise_multiplier=noise, seed=0)
    change = _delta_norm(before, model)
    if noise is None:
        assert change > 10 * clip  # the unclipped gradient is far larger than the bound
    else:
        # one step of the mean of per-sample gradients each clipped to `clip`, with q=1:
        # every sample is drawn, so the step is at most `clip` (times lr=1)
        assert 0 < change <= clip * (1 + 1e-5)


@pytest.mark.parametrize(("n", "batch", "physical"), [(40, 32, 16), (500, 32, 8), (7, 32, 32)])
def test_accounted_steps_and_rate_are_those_opacus_trains_with(
    n: int, batch: int, physical: int
) -> None:
    """The ledger calibrates and charges with sample_rate/steps_per_epoch: they must be what
    Opacus' Poisson loader really does, virtual (memory-split) steps not counted twice."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    from fedct.client.training import sample_rate, steps_per_epoch

    data = TensorDataset(torch.randn(n, 1, 4, 4), torch.randint(0, 2, (n,)))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=batch))
    assert sample_rate(n, batch) == pytest.approx(dp_loader.sample_rate)
    assert steps_per_epoch(n, batch) == len(dp_loader)
    cfg = TrainConfig(epochs=2, batch_size=batch, physical_batch_size=physical)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    result = train_local(model, data, cfg, noise_multiplier=1.0, seed=0)
    assert result.steps == 2 * steps_per_epoch(n, batch)


def test_privacy_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedct.common.cli import main

    ledger = Ledger.open(tmp_path, PrivacyBudget(epsilon=8.0, delta=1e-5))
    ledger.record(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10, model_version="abc")
    assert main(["privacy", "report", str(tmp_path), "--epsilon", "8"]) == 0
    out = capsys.readouterr().out
    assert "abc" in out
    assert f"remaining {8 - ledger.spent_epsilon:.3f}" in out
    ledger.path.write_text("{}")
    assert main(["privacy", "report", str(tmp_path)]) == 1  # corrupted: a clear error


@pytest.mark.parametrize("clipping", ["bookkeeping", "hooks"])
def test_dp_adamw_first_step_is_adam_on_the_clipped_mean_gradient(clipping: str) -> None:
    """Known answer: with q = 1 and no noise, DP-AdamW's first step is Adam's bias-corrected
    first step, lr * g / (|g| + eps), on g = the mean of per-sample gradients each clipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x, y = torch.randn(8, 1, 4, 4) * 10, torch.randint(0, 2, (8,))
    clip, lr = 0.05, 0.01
    clipped = []
    for i in range(8):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        clipped.append([g * min(1.0, clip / float(norm)) for g in grads])
    mean = [torch.stack(parts).mean(0) for parts in zip(*clipped, strict=True)]
    expected = [
        p.detach() - lr * g / (g.abs() + 1e-8)
        for p, g in zip(model.parameters(), mean, strict=True)
    ]
    cfg = TrainConfig(
        optimizer="adamw",
        batch_size=8,
        physical_batch_size=8,
        learning_rate=lr,
        max_grad_norm=clip,
        dp_clipping=clipping,
    )
    train_local(model, TensorDataset(x, y), cfg, noise_multiplier=0.0, seed=0)
    for p, want in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p.detach(), want, atol=1e-5)

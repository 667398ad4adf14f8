"""Book-keeping clipping (client/bookkeeping.py) against the definition of DP-SGD clipping:
every sample's own gradient (autograd, one sample at a time), clipped, then summed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import TensorDataset

from fedct.client.bookkeeping import BookkeepingModule
from fedct.client.training import TrainConfig, train_local
from fedct.common.errors import ConfigError
from fedct.common.models import ChannelAffine, ModelConfig, build_model


def _clipped_sum_by_definition(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float
) -> dict[str, torch.Tensor]:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable.items()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))  # Opacus' clipping factor
        for n, g in grads.items():
            total[n] += factor * g
    model.zero_grad()
    return total


@pytest.mark.parametrize(
    ("norm", "freeze"),
    [(n, f) for n in ("group", "folded") for f in ("none", "last1", "bias")] + [("folded", "film")],
)
@pytest.mark.parametrize("clip", [1e-3, 1e6])  # every sample clipped / none clipped
def test_bookkeeping_gives_the_clipped_sum_of_true_per_sample_gradients(
    norm: str, freeze: str, clip: float
) -> None:
    """At 40 px the model has stages where the per-sample gradient is taken (early: many
    positions) and stages where only its ghost norm is (late): both paths, both conv kinds
    (weight-standardized for group, biased for folded), GroupNorm, the folded network's
    per-channel affine and Linear are checked."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(norm=norm, freeze=freeze)).double().train()
    with torch.no_grad():  # an affine away from the identity, so its chain rule is exercised
        for m in model.modules():
            if isinstance(m, ChannelAffine):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x, y = torch.randn(5, 3, 40, 40, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    expected = _clipped_sum_by_definition(model, x, y, clip)
    wrapped = BookkeepingModule(model, max_grad_norm=clip)
    wrapped.backward(nn.functional.cross_entropy(wrapped(x), y, reduction="none"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-7, atol=1e-12, msg=name)
        else:
            assert p.grad is None, name
    wrapped.remove_hooks()
    wrapped.cleanup()
    assert not any(hasattr(m, "_clipped_sums") for m in model.modules())
    model(x)  # plain forward after the hooks are gone


def test_bookkeeping_step_adds_opacus_noise_to_the_clipped_mean() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    expected = _clipped_sum_by_definition(model, x, y, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = BookkeepingModule(model, max_grad_norm=0.1)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        expected_batch_size=4,
    )
    wrapped.backward(nn.functional.cross_entropy(wrapped(x), y, reduction="none"))
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name] / 4)


def test_unsupported_layers_are_refused_with_the_alternative() -> None:
    with pytest.raises(ConfigError, match='dp-clipping = "hooks"'):
        BookkeepingModule(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="LayerNorm"):
        BookkeepingModule(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), max_grad_norm=1.0)


def _tiny_site(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 2, (n,), generator=g)
    )


def test_train_local_bookkeeping_and_opacus_hooks_take_the_same_private_steps() -> None:
    """Same seed, same Poisson batches, no noise: the two clipping implementations must end at
    the same model (virtual steps included: physical batches of 5 under a logical 12)."""
    results = []
    for clipping in ("bookkeeping", "hooks"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(freeze="last1"))
        cfg = TrainConfig(
            epochs=2,
            batch_size=12,
            physical_batch_size=5,
            max_grad_norm=0.5,
            learning_rate=0.1,
            dp_clipping=clipping,
        )
        result = train_local(model, _tiny_site(), cfg, noise_multiplier=0.0, seed=3)
        results.append((result, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (bk, bk_params), (hooks, hooks_params) = results
    assert bk.steps == hooks.steps
    assert bk.mean_loss == pytest.approx(hooks.mean_loss, rel=1e-4)
    torch.testing.assert_close(bk_params, hooks_params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clipping", ["bookkeeping", "hooks"])
def test_fedprox_pull_is_applied_under_dp(clipping: str) -> None:
    """FedProx under DP: the proximal pull is a separate, data-free step. With mu = 1/lr it
    returns every parameter to the global model after each step, so training changes nothing."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(freeze="head"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(
        batch_size=8,
        physical_batch_size=8,
        learning_rate=0.5,
        momentum=0.0,
        proximal_mu=2.0,
        dp_clipping=clipping,
    )
    train_local(model, _tiny_site(), cfg, noise_multiplier=1.0, seed=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], msg=name)
    train_local(model, _tiny_site(), replace(cfg, proximal_mu=0.0), noise_multiplier=1.0, seed=0)
    assert not torch.equal(model.fc.weight.detach(), before["fc.weight"])


def test_dp_clipping_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="bookkeeping, hooks"):
        TrainConfig(dp_clipping="ghost")

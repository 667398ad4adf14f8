"""Public pretraining: a BatchNorm ResNet on public folders, folded into the federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

from fedct.common.config import FederationConfig
from fedct.common.dataset import site_dataset
from fedct.common.errors import ConfigError
from fedct.common.models import build_model
from fedct.common.site import load_site
from fedct.common.training_stats import stats_from_metadata
from fedct.server.pretrain import METADATA_KEY, pretrain, stock_resnet
from tests.conftest import write_tiny_site


def test_pretrained_weights_start_the_federation_exactly(tmp_path: Path, tiny_site: Path) -> None:
    second = write_tiny_site(tmp_path / "public-b", seed=3, index=1)
    fed = FederationConfig(image_size=32)
    out = tmp_path / "weights" / "public.safetensors"
    result = pretrain(
        [tiny_site, second], fed, out, epochs=2, cache_root=tmp_path / "cache", progress=False
    )
    assert result.path == out
    assert out.is_file()
    assert result.train_slices > 0
    assert result.held_out_slices > 0
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        about = json.loads(metadata[METADATA_KEY])
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert about["image-size"] == 32
    assert about["classes"] == fed.classes
    stats = stats_from_metadata(metadata)  # what it was trained on, computed directly
    assert stats is not None
    assert stats.hu_from == "pooled pixels"
    assert stats.hu_quantiles is not None
    assert list(stats.hu_quantiles) == sorted(stats.hu_quantiles)
    assert stats.scores is not None
    assert stats.scores.slices == result.held_out_slices
    assert any(k.endswith("running_var") for k in state)  # BatchNorm statistics to fold

    # Known answer: the reported AUROC is the saved network's on both folders' held-out
    # patients, recomputed here from its probabilities with scikit-learn.
    reference = stock_resnet(fed)
    reference.load_state_dict(state)
    reference.eval()
    scores, positive = [], []
    for folder in (tiny_site, second):
        site = load_site(
            folder,
            grid=fed.preprocess.grid,
            cache_dir=tmp_path / "cache" / folder.name,  # pretraining's frame cache: quicker
            val_fraction=fed.val_fraction,
            progress=False,
        )
        held_out = site_dataset(
            site,
            site.eval_split(),
            classes=fed.class_names,
            windows=fed.preprocess.windows,
            train=False,
        )
        images, targets = zip(*(held_out[i] for i in range(len(held_out))), strict=True)
        with torch.no_grad():
            scores += torch.softmax(reference(torch.stack(images)), 1)[:, -1].tolist()
        positive += [t == len(fed.class_names) - 1 for t in targets]
    assert len(scores) == result.held_out_slices
    assert 0 < sum(positive) < len(positive)  # both classes held out: the AUROC is defined
    assert result.held_out_auroc == pytest.approx(roc_auc_score(positive, scores), abs=1e-6)
    assert about["held-out-auroc"] == round(result.held_out_auroc, 4)

    # The federation's DP model (norm auto -> folded) computes the pretrained network itself.
    started = FederationConfig(image_size=32, pretrained=str(out))
    assert started.resolved_norm == "folded"
    model = build_model(started.model_config).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_pretraining_refuses_what_it_cannot_use(tmp_path: Path, tiny_site: Path) -> None:
    fed = FederationConfig(image_size=32)
    with pytest.raises(ConfigError, match="at least one public"):
        pretrain([], fed, tmp_path / "w.safetensors", cache_root=tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        pretrain([tiny_site], fed, tmp_path / "w.safetensors", epochs=0, cache_root=tmp_path)


def test_folded_norm_needs_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="fedct pretrain"):
        FederationConfig(norm="folded")
    assert FederationConfig().resolved_norm == "group"
    with pytest.raises(ConfigError, match="norm must be"):
        FederationConfig(norm="batch")


def test_one_window_pretraining_fits_a_one_channel_federation(
    tmp_path: Path, tiny_site: Path
) -> None:
    fed = FederationConfig(image_size=32, windows="lung")
    out = tmp_path / "lung.safetensors"
    pretrain([tiny_site], fed, out, epochs=1, cache_root=tmp_path / "cache", progress=False)
    started = FederationConfig(image_size=32, windows="lung", pretrained=str(out))
    model = build_model(started.model_config).eval()
    reference = stock_resnet(fed)
    with safe_open(str(out), framework="pt") as handle:
        reference.load_state_dict({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    reference.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_simulation_start_settings(tmp_path: Path) -> None:
    from rich.console import Console

    from fedct.common.errors import FedCTError
    from fedct.simulations.simulate import (
        PRETRAINED_FINE_TUNING,
        SimulationPaths,
        prepare_pretrained,
    )

    paths, console = SimulationPaths(tmp_path), Console(quiet=True)
    assert prepare_pretrained("none", paths, {"seed": 1}, seed=1, console=console) == {"seed": 1}
    with pytest.raises(FedCTError, match="no such weights file"):
        prepare_pretrained(str(tmp_path / "absent.pth"), paths, {}, seed=0, console=console)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # only its existence matters here
    chosen = prepare_pretrained(str(weights), paths, {"freeze": "last1"}, seed=0, console=console)
    assert chosen["pretrained"] == str(weights.resolve())
    assert chosen["freeze"] == "last1"  # the user's setting wins over the recipe
    assert chosen["learning-rate"] == PRETRAINED_FINE_TUNING["learning-rate"]

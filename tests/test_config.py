from __future__ import annotations

import importlib
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from fedct.common.app_bundle import write_app
from fedct.common.config import FederationConfig, SiteConfig, app_defaults, parse_overrides
from fedct.common.errors import ConfigError, FedCTError
from fedct.common.version import VersionMismatchError, require_same_version


def test_the_flower_app_is_settings_only_and_names_the_installed_fedct(tmp_path: Path) -> None:
    app = write_app(tmp_path / "app")
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # no code to ship
    project = tomllib.loads((app / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {
        "serverapp": "fedct.server.server_app:app",
        "clientapp": "fedct.client.client_app:app",
    }
    assert flwr_app["config"] == FederationConfig().to_mapping()
    assert flwr_app["config"]["fedct-version"] == version("fedct") == project["project"]["version"]
    for ref in flwr_app["components"].values():  # importable from the installed package
        module, _, attr = ref.partition(":")
        assert hasattr(importlib.import_module(module), attr)
    (app / "task.py").write_text("import os\n")
    with pytest.raises(FedCTError, match=r"task\.py"):
        write_app(app)


def test_a_hospital_refuses_another_fedct_version() -> None:
    require_same_version(version("fedct"))
    with pytest.raises(VersionMismatchError) as err:
        require_same_version("0.0.1")
    assert "0.0.1" in str(err.value)
    assert version("fedct") in str(err.value)


def test_run_config_overrides_and_errors() -> None:
    fed = FederationConfig.from_mapping({**app_defaults(), "num-server-rounds": "3", "dp": "false"})
    assert fed.num_server_rounds == 3
    assert fed.dp is False
    with pytest.raises(ConfigError, match="unknown run config key"):
        FederationConfig.from_mapping({"num-rounds": 3})
    with pytest.raises(ConfigError, match="not a valid int"):
        FederationConfig.from_mapping({"num-server-rounds": "many"})
    with pytest.raises(ConfigError, match=r"local-epochs = 1\.5 is not a valid int"):
        FederationConfig.from_mapping({"local-epochs": 1.5})
    with pytest.raises(ConfigError, match="not a valid bool"):
        FederationConfig.from_mapping({"dp": "maybe"})
    typed = FederationConfig.from_mapping({"dp": "no", "epsilon": "4", "output-dir": 2026})
    assert (typed.dp, typed.epsilon, typed.output_dir) == (False, 4.0, "2026")
    with pytest.raises(ConfigError, match="fedavg"):
        FederationConfig.from_mapping({"strategy": "fedsgd"})


def test_parse_overrides() -> None:
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=lung,bone"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "lung,bone",
    }
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_site_config_needs_its_own_folders_and_budget() -> None:
    with pytest.raises(ConfigError, match="data-dir"):
        SiteConfig.from_mapping({"site-name": "a"})
    with pytest.raises(ConfigError, match="epsilon"):
        SiteConfig(site_name="a", data_dir="d", state_dir="s", epsilon=0.0)


def test_cosine_learning_rate_over_the_planned_rounds() -> None:
    fed = FederationConfig(learning_rate=1.0, lr_schedule="cosine", num_server_rounds=5)
    rates = [fed.round_learning_rate(r) for r in range(1, 8)]
    assert rates[:5] == pytest.approx([1.0, 0.9045, 0.6545, 0.3455, 0.0955], abs=1e-4)
    assert rates[5:] == [0.05, 0.05]  # a resumed or extended run keeps a floor
    planned = FederationConfig(
        learning_rate=1.0, lr_schedule="cosine", num_server_rounds=2, planned_rounds=4
    )
    assert planned.round_learning_rate(2) == pytest.approx(0.8536, abs=1e-4)
    constant = FederationConfig(learning_rate=0.3, lr_schedule="constant")
    assert {constant.round_learning_rate(r) for r in (1, 9)} == {0.3}


def test_recipe_settings_name_their_choices() -> None:
    with pytest.raises(ConfigError, match="adamw, sgd"):
        FederationConfig(optimizer="lamb")
    with pytest.raises(ConfigError, match="constant, cosine"):
        FederationConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="none, body"):
        FederationConfig(crop="lung")


def _readme_table() -> dict[str, str]:
    """README's configuration reference: key -> the default it documents."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if not row.startswith("| `") or len(cells) < 3:
            continue
        keys = [k.strip().strip("`") for k in cells[0].split(",")]
        defaults = [d.strip() for d in cells[1].split(", ")]
        assert len(keys) == len(defaults), row
        documented.update(zip(keys, defaults, strict=True))
        for other in re.findall(r"\(`([a-z-]+)`(?:, ([0-9.]+))?", cells[2]):
            documented.setdefault(other[0], other[1] or "(in the text)")
    return documented


def _same(documented: str, value: object) -> bool:
    shown = re.sub(r"\s*\(.*\)$", "", documented).strip("`")
    if isinstance(value, bool):
        return shown == str(value).lower()
    if isinstance(value, int | float):
        try:
            return float(shown) == float(value)
        except ValueError:
            return False
    return shown == (str(value) or '""')


def test_the_readme_documents_every_setting_with_its_default() -> None:
    documented = _readme_table()
    defaults = FederationConfig().to_mapping()
    assert set(documented) >= set(defaults), sorted(set(defaults) - set(documented))
    assert set(documented) <= set(defaults), sorted(set(documented) - set(defaults))
    for key, value in defaults.items():
        if documented[key] in ("(in the text)", "the installed version"):
            continue
        assert _same(documented[key], value), (key, documented[key], value)


def test_a_hospitals_client_app_refuses_a_run_of_another_version(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fedct.client.client_app import run_settings
    from fedct.common.audit import verify

    node = {"site-name": "a", "data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path)}

    def context(run_version: str) -> Context:
        config = {**app_defaults(), "fedct-version": run_version}
        return Context(run_id=3, node_id=1, node_config=node, state=RecordDict(), run_config=config)

    assert run_settings(context(version("fedct"))).fedct_version == version("fedct")
    with pytest.raises(VersionMismatchError, match=r"FedCT 9\.9\.9.*FedCT " + version("fedct")):
        run_settings(context("9.9.9"))
    (refusal,) = verify(tmp_path).refused  # the refusal is in the hospital's audit log
    assert refusal.startswith("run 3: the run was made by FedCT 9.9.9")

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedct.common.errors import FedCTError
from fedct.server.allow_list import (
    ALLOWED_NODES,
    keep_allowed,
    read_allow_list,
    warn_strangers,
    write_allow_list,
)


def test_only_the_hospitals_nodes_take_part_and_strangers_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_allow_list(tmp_path, {"alpha": "11", "beta": "12"})
    allowed = read_allow_list(tmp_path)
    assert allowed == {11: "alpha", 12: "beta"}
    kept, strangers = keep_allowed([11, 12, 99], allowed)
    assert (kept, strangers) == ({11, 12}, [99])
    with caplog.at_level(logging.WARNING, logger="fedct.server.allow_list"):
        warn_strangers(strangers, server_round=3)
        warn_strangers([], server_round=4)
    (warning,) = caplog.records
    assert "round 3" in warning.message
    assert "99" in warning.message
    assert "11" not in warning.message


def test_without_an_allow_list_every_node_takes_part(tmp_path: Path) -> None:
    assert read_allow_list(tmp_path) is None
    assert keep_allowed([1, 2], None) == ({1, 2}, [])


def test_a_broken_allow_list_is_refused(tmp_path: Path) -> None:
    (tmp_path / ALLOWED_NODES).write_text('{"alpha": "eleven"}')
    with pytest.raises(FedCTError, match="hospital: node id"):
        read_allow_list(tmp_path)

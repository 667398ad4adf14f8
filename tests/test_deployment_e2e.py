"""FedCT on Flower's real deployment engine, on loopback: `fedct server` (a flower-superlink
with TLS, SuperNode authentication and a database) and one `fedct client` (a flower-supernode)
per hospital, each a separate process group that the test always stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedct.client.privacy import LEDGER_FILE, read_entries
from fedct.common.audit import AUDIT_FILE, verify
from fedct.server.allow_list import read_allow_list
from fedct.simulations.loopback import LoopbackFederation
from tests.conftest import groups_alive, process_groups_under, write_tiny_site

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SITES = ("alpha", "beta")
RUN_SETTINGS = [
    "--set",
    "image-size=32",
    "--set",
    "min-eval-cases=1",
    "--set",
    "batch-size=8",
    "--set",
    "planned-rounds=2",
]


class Federation(LoopbackFederation):
    def __init__(self, root: Path) -> None:
        data = {}
        for i, name in enumerate(SITES):
            data[name] = write_tiny_site(root / "data" / name, index=i, seed=i, matrix=48)
        super().__init__(root, data)

    def server(self, *args: str) -> subprocess.Popen[bytes]:
        return super().server(*RUN_SETTINGS, *args)

    def wait(self, child: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {timeout:.0f} s\n{self.logs()}")


def _audit_records(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / AUDIT_FILE).open()]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        groups = process_groups_under({c.pid for c in fed.children})
        fed.stop()
        left = groups_alive(groups)
        assert not left, f"processes left running: {left}"


def test_tls_authenticated_federation_resumes_after_restart_and_stops_at_the_budget(
    federation: Federation,
) -> None:
    server = federation.server("--rounds", "1")
    for name in SITES:
        federation.client(name)
    assert federation.wait(server, 400) == 0, federation.logs()
    assert [r["round"] for r in federation.metrics()] == [1]
    # both hospitals trained from the starting model they kept when they evaluated it
    assert federation.metrics()[0]["model-kept-by"] == len(SITES)
    allowed = read_allow_list(federation.state / "run")  # the hospitals' nodes, nobody else
    assert allowed is not None
    assert sorted(allowed.values()) == sorted(SITES)
    (record,) = federation.runs()  # what the SuperLink counted for the run
    assert record["status"] == "finished:completed"
    assert record["network-traffic"]["total-bytes"] > 0
    assert set(federation.metrics()[0]["train"]) == set(SITES)  # type: ignore[arg-type]
    checkpoints = federation.state / "run" / "checkpoints"
    assert (checkpoints / "round-0001.safetensors").is_file()
    for name in SITES:
        assert [e.round for e in read_entries(federation.site_state(name))] == [1]

    # The server stops and starts again on the same state folder: it resumes at round 2, and
    # the hospitals' SuperNodes (still running) reconnect on their own. Round 3 is beyond the
    # privacy horizon (planned-rounds = 2): both hospitals refuse to train, and the run goes on.
    server = federation.server("--rounds", "3")
    assert federation.wait(server, 400) == 0, federation.logs()
    history = federation.metrics()
    assert [r["round"] for r in history] == [1, 2, 3]
    assert set(history[1]["train"]) == set(SITES)  # type: ignore[arg-type]
    assert history[2]["train"] == {}
    assert history[2]["exhausted"] == sorted(SITES)
    assert (checkpoints / "round-0002.safetensors").is_file()
    assert (federation.state / "run" / "final_model.safetensors").is_file()
    for name in SITES:
        entries = read_entries(federation.site_state(name))
        assert [e.round for e in entries] == [1, 2]  # nothing spent beyond the budget
        assert entries[-1].epsilon <= 8.0
        audited = verify(federation.site_state(name))  # the hospital's audit log holds
        # three rounds, and the starting model's evaluation before round 1 (not again on resume)
        assert audited.kinds == {"train": 3, "evaluate": 4}
        trained = [r for r in _audit_records(federation.site_state(name)) if r["kind"] == "train"]
        # round 1 from the kept starting model; round 2, after the restart, the model was sent;
        # round 3 named the model each kept from round 2's evaluation
        assert [r["model"]["source"] for r in trained] == ["kept", "received", "kept"]
        assert trained[-1]["status"] == "budget-exhausted"
        assert audited.last_epsilon == pytest.approx(entries[-1].epsilon)
    assert verify(federation.state / "run").kinds == {"round": 3}
    assert all(c.poll() is None for c in federation.clients.values())


# Flower's SuperNode prints this when it takes a training message from the SuperLink; `fedct
# client` copies that output into the hospital's log. The ClientApp that then starts needs
# seconds (process start, imports, training) before it could reply. (A site's first task is
# often the starting model's evaluation, "round 0", which must not be taken for its training.)
TRAINING_TAKEN = b"Receiving: train message"


def test_a_hospital_that_drops_out_mid_round_does_not_stop_the_federation(
    federation: Federation,
) -> None:
    rounds = 4
    server = federation.server(
        "--rounds",
        str(rounds),
        "--set",
        "min-sites=1",
        "--set",
        "round-timeout=60.0",  # the round beta drops out of waits at most this long for it
        "--set",
        f"planned-rounds={rounds}",  # every round within the sites' privacy budgets
    )
    for name in SITES:
        federation.client(name)
    beta = federation.clients["beta"]
    beta_log = federation.root / "client-beta.log"
    deadline = time.monotonic() + 300
    # beta takes its first training task (round 1, or round 2 when it came online only after
    # round 1's training was sent) ...
    while TRAINING_TAKEN not in beta_log.read_bytes():
        assert time.monotonic() < deadline, federation.logs()
        assert server.poll() is None, federation.logs()
        time.sleep(0.05)
    for group in process_groups_under({beta.pid}):  # ... when the hospital's machine goes away
        os.killpg(group, signal.SIGKILL)
    beta.wait()
    # the server records each round before it sends the next round's training
    dropped = len(federation.metrics()) + 1
    assert dropped <= 2, f"beta came online late: first trained in round {dropped}"
    ledger = federation.site_state("beta") / LEDGER_FILE
    assert not ledger.exists() or read_entries(ledger.parent) == [], "beta finished first"
    federation.client("beta")  # ... and comes back
    assert federation.wait(server, 500) == 0, federation.logs()
    history = federation.metrics()
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    trained = [set(r["train"]) for r in history]
    assert trained[dropped - 1] == {"alpha"}  # the round went on without beta
    # ... and beta trains again in a later round (Flower lets a node that vanished activate
    # again only once its last heartbeat has lapsed, 37-60 s after; the round it left ends then)
    assert set(SITES) in trained[dropped:]
    assert (federation.state / "run" / "final_model.safetensors").is_file()

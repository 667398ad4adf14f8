"""Who gets in: a stranger holding only the public ``ca.crt`` tries, through the server's public
address, every attack that worked against an exposed SuperLink (issue #17); all fail, because
`fedct server` exposes only Flower's Fleet API (through nginx). A node registered some other
way - on the server host itself - connects, but the ServerApp does not select it and names it
in its log. The hospitals' run completes."""

from __future__ import annotations

import json
import re
import ssl
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest

from fedct.common.app_bundle import write_app
from fedct.common.audit import AuditError, verify
from fedct.server.certs import create
from fedct.server.deploy import ServerSettings, flwr
from tests.test_deployment_e2e import SITES, Federation
from tests.test_deployment_e2e import federation as federation  # the fixture

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _flwr(home: Path, *args: str) -> dict[str, Any]:
    """``flwr ARGS`` with the CLI configuration of ``home`` (a folder holding ``flwr-home/``)."""
    return flwr(ServerSettings(home, None), *args)


def _stranger_home(root: Path, address: str, ca: Path) -> Path:
    home = root / "stranger"
    (home / "flwr-home").mkdir(parents=True)
    (home / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "target"\n\n[superlink.target]\n'
        f'address = "{address}"\nroot-certificates = {json.dumps(str(ca))}\n'
    )
    return home


def _wait_for(what: str, check: Any, fed: Federation, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{fed.logs()}")


def test_a_stranger_with_the_ca_certificate_gets_nowhere(
    federation: Federation,
) -> None:
    public = f"127.0.0.1:{federation.port}"
    ca = federation.certs / "ca.crt"
    stranger_keys = federation.root / "stranger-keys"
    create(stranger_keys, ["stranger"], [])  # a key pair of its own, not issued by fedct certs
    stranger_pub = stranger_keys / "hospitals" / "stranger.pub"
    server = federation.server("--rounds", "1")
    server_log = federation.root / "server.log"
    run_id = _wait_for(
        "the FedCT run",
        lambda: re.findall(r"FedCT run (\d+) started", server_log.read_text(errors="replace")),
        federation,
    )[0]

    home = _stranger_home(federation.root, public, ca)
    attempts = {
        "register a key": ("supernode", "register", str(stranger_pub), "target"),
        "list runs": ("ls", "target"),
        "list nodes": ("supernode", "ls", "target"),
        "read the log": ("log", run_id, "target", "--show"),
        "submit a run": ("run", str(write_app(federation.root / "evil-app")), "target"),
        "stop the FedCT run": ("stop", run_id, "target"),
    }
    for what, args in attempts.items():
        answer = _flwr(home, *args)
        assert not answer.get("success"), f"the stranger could {what}: {answer}"
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(
        f"https://{public}/v1/runtime/acquire-task", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code == 404
    # on the server host itself, the Runtime API hands tasks only to requests signed with the
    # SuperExec secret of STATE/superexec.secret
    local = tomllib.loads((federation.state / "flwr-home" / "config.toml").read_text())
    address = local["superlink"]["fedct"]["address"]
    asked = AcquireTaskRequest(supported_task_types=["flwr-serverapp"]).SerializeToString()
    request = urllib.request.Request(
        f"https://{address}/v1/runtime/acquire-task",
        data=asked,
        headers={"content-type": "application/protobuf"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code in (401, 403), refused.value.code
    request = urllib.request.Request(f"https://{public}/v1/fleet/get-run", method="GET")
    with pytest.raises(urllib.error.HTTPError) as refused:  # only POST, as SuperNodes send
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code == 403

    # Registered on the server host (a careless coordinator): it connects, and is ignored.
    registered = _flwr(
        federation.state,
        "supernode",
        "register",
        str(stranger_pub),
        "fedct",
    )
    assert registered.get("success"), registered
    stranger_node = str(registered["node-id"])
    federation.data["stranger"] = federation.data[SITES[0]]
    federation.client("stranger", key=stranger_keys / "hospitals" / "stranger.key")

    def online() -> bool:
        nodes = _flwr(federation.state, "supernode", "ls", "fedct").get("nodes", [])
        return any(n["node-id"] == stranger_node and n["status"] == "online" for n in nodes)

    _wait_for("the stranger's node to come online", online, federation)
    for name in SITES:
        federation.client(name)
    assert federation.wait(server, 400) == 0, federation.logs()
    assert set(federation.metrics()[0]["train"]) == set(SITES)  # type: ignore[arg-type]
    (round_record,) = federation.metrics()
    assert round_record["ignored-nodes"] == [stranger_node]  # named, never selected
    (audited,) = [json.loads(line) for line in (federation.state / "run" / "audit.jsonl").open()]
    assert audited["ignored-nodes"] == [stranger_node]
    assert audited["accepted"] == sorted(SITES)
    access = (federation.state / "proxy" / "access.log").read_text()
    assert "/v1/control/" in access  # tried, and answered 404
    assert "/v1/runtime/" in access


EVIL_PROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "evil:server"
clientapp = "evil:client"

[tool.flwr.app.config]
"""

# a ClientApp that leaves a marker file with its node config (the data folder among it) when
# it is imported at a hospital (whose FLWR_HOME lies in its state folder under sites/; the
# ServerApp imports this module too, on the server host) and when it handles a message; its
# ServerApp sends one to every node
EVIL_CODE = """\
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

MARKER = Path({marker!r})
if "/sites/" in os.environ.get("FLWR_HOME", ""):
    MARKER.write_text("imported at a hospital")

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    MARKER.write_text(str(dict(context.node_config)))
    return Message(RecordDict({{"r": ConfigRecord({{"ok": 1}})}}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    ask = RecordDict({{"q": ConfigRecord({{"x": 1}})}})
    msgs = [Message(ask, dst_node_id=n, message_type="query") for n in nodes]
    list(grid.send_and_receive(msgs, timeout=180))
"""


def _audit(state: Path) -> list[dict[str, Any]]:
    path = state / "audit.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def test_a_run_whose_bundle_carries_code_is_refused_at_every_hospital(
    federation: Federation,
) -> None:
    marker = federation.root / "marker.txt"
    evil = federation.root / "evil-app"
    evil.mkdir()
    (evil / "pyproject.toml").write_text(EVIL_PROJECT)
    (evil / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))

    server = federation.server("--rounds", "1", "--keep-running")
    for name in SITES:
        federation.client(name)
    server_log = federation.root / "server.log"
    _wait_for(
        "the FedCT run to finish",
        lambda: "SuperLink keeps running" in server_log.read_text(errors="replace"),
        federation,
        timeout=400,
    )
    assert server.poll() is None

    # submitted on the server host itself: a compromised or careless coordinator
    submitted = _flwr(federation.state, "run", str(evil), "fedct")
    assert submitted.get("success"), submitted
    evil_run = int(submitted["run-id"])

    def refused_everywhere() -> bool:
        return all(
            any(r.get("run-id") == evil_run and r.get("status") == "refused" for r in _audit(s))
            for s in map(federation.site_state, SITES)
        )

    _wait_for("both hospitals to refuse the bundle", refused_everywhere, federation, 240)
    assert not marker.exists()  # its code never ran at a hospital
    for name in SITES:
        state = federation.site_state(name)
        (refusal,) = [r for r in _audit(state) if r.get("run-id") == evil_run]
        assert "carries files besides FedCT's pyproject.toml (evil.py" in refusal["reason"]
        (fedct_train,) = [r for r in _audit(state) if r["kind"] == "train"]
        assert len(fedct_train["bundle-sha256"]) == 64  # the checked bundle it ran
        assert refusal["bundle-sha256"] not in (fedct_train["bundle-sha256"], "")
        summary = verify(state)
        assert summary.kinds["run"] == 1
        assert summary.kinds["train"] == 1  # FedCT's own run went through the same executor
    assert all(c.poll() is None for c in federation.clients.values())

    log_path = federation.site_state(SITES[0]) / "audit.jsonl"
    text = log_path.read_text()  # hide the refusal: the chain no longer holds
    assert text.count('"status": "refused"') == 1
    log_path.write_text(text.replace('"status": "refused"', '"status": "accepted"'))
    with pytest.raises(AuditError):
        verify(federation.site_state(SITES[0]))

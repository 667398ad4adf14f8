"""Who gets in: a stranger holding only the public ``ca.crt`` tries, through the server's public
address, every attack that worked against an exposed SuperLink (issue #17); all fail, because
`fedct server` exposes only Flower's Fleet API (through nginx). A node registered some other
way - on the server host itself - connects, but the ServerApp does not select it and names it
in its log. The hospitals' run completes."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedct.common.app_bundle import write_app
from fedct.common.flower_tools import executable, flower_environment
from fedct.server.certs import create
from tests.test_deployment_e2e import SITES, Federation
from tests.test_deployment_e2e import federation as federation  # the fixture

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _flwr(home: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [executable("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=flower_environment(FLWR_HOME=str(home)),
        timeout=120,
    )
    text = done.stdout
    try:
        answer: dict[str, Any] = json.loads(text[text.index("{") :])
    except ValueError:
        answer = {"success": False, "error-message": (done.stderr or text).strip()}
    answer["returncode"] = done.returncode
    return answer


def _stranger_home(root: Path, address: str, ca: Path) -> Path:
    home = root / "stranger-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
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
    request = urllib.request.Request(f"https://{public}/v1/fleet/get-run", method="GET")
    with pytest.raises(urllib.error.HTTPError) as refused:  # only POST, as SuperNodes send
        urllib.request.urlopen(request, context=context, timeout=30)
    assert refused.value.code == 403

    # Registered on the server host (a careless coordinator): it connects, and is ignored.
    registered = _flwr(
        federation.state / "flwr-home",
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
        nodes = _flwr(federation.state / "flwr-home", "supernode", "ls", "fedct").get("nodes", [])
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

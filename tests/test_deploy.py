"""The deployment commands' pieces, without starting Flower (the loopback e2e tests do that)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedct.client.node import NodeSettings, check_site, supernode_args
from fedct.common.cli import main
from fedct.common.config import SiteConfig
from fedct.common.errors import ConfigError, SiteDataError
from fedct.server.certs import CertPaths, create, server_names_of
from fedct.server.deploy import ServerSettings, superlink_args, write_flower_config


def test_certs_are_complete_valid_and_never_overwritten(tmp_path: Path) -> None:
    written = create(tmp_path, ["hospital-a"], ["fedct.example.org", "10.0.0.5"])
    paths = CertPaths(tmp_path)
    assert paths.hospitals() == ["hospital-a"]
    assert {"fedct.example.org", "10.0.0.5", "localhost", "127.0.0.1"} <= set(
        server_names_of(paths.server_cert)
    )
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    key = serialization.load_ssh_private_key(paths.hospital_key("hospital-a").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert oct(paths.hospital_key("hospital-a").stat().st_mode)[-3:] == "600"
    before = {p: p.read_bytes() for p in written}
    again = create(tmp_path, ["hospital-a", "hospital-b"], [])
    assert {p.name for p in again} == {"hospital-b.key", "hospital-b.pub"}
    assert all(p.read_bytes() == data for p, data in before.items())
    with pytest.raises(ConfigError, match="invalid hospital name"):
        create(tmp_path, ["../evil"], [])


def test_superlink_is_secure_unless_told_otherwise(tmp_path: Path) -> None:
    create(tmp_path / "c", [], [])
    secure = superlink_args(ServerSettings(tmp_path / "s", CertPaths(tmp_path / "c")))
    assert "--enable-supernode-auth" in secure
    assert "--insecure" not in secure
    assert "--ssl-certfile" in secure
    assert "--disable-runtime-dependency-installation" in secure
    insecure = ServerSettings(tmp_path / "s", None, host="0.0.0.0", port=9100, proxy=False)
    assert "--insecure" in superlink_args(insecure)
    config = tomllib.loads(write_flower_config(insecure).read_text())
    assert config["superlink"]["fedct"] == {"address": "127.0.0.1:9100", "insecure": True}


def test_behind_the_proxy_the_superlink_listens_on_loopback_only(tmp_path: Path) -> None:
    create(tmp_path / "c", [], [])
    settings = ServerSettings(
        tmp_path / "s", CertPaths(tmp_path / "c"), host="0.0.0.0", port=9100, superlink_port=9200
    )
    args = superlink_args(settings)
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "9200"
    config = tomllib.loads(write_flower_config(settings).read_text())
    assert config["superlink"]["fedct"]["address"] == "127.0.0.1:9200"  # the flwr CLI: local


def test_server_refuses_to_start_without_certs_or_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["server", "--state", str(tmp_path)]) == 1
    said = capsys.readouterr()
    assert "--insecure" in said.out + said.err


def test_supernode_gets_the_sites_own_config(tmp_path: Path, tiny_site: Path) -> None:
    site = SiteConfig("hospital-a", str(tiny_site), str(tmp_path / "state"), epsilon=3.0)
    settings = NodeSettings(site, "srv:8000", tmp_path / "ca.crt", tmp_path / "a.key")
    args = supernode_args(settings)
    assert "--insecure" not in args
    assert "--root-certificates" in args
    node = tomllib.loads(Path(args[args.index("--node-config") + 1]).read_text())
    assert node["site-name"] == "hospital-a"
    assert node["epsilon"] == 3.0
    assert node["dp"] is True
    assert SiteConfig.from_mapping(node).data_dir == str(tiny_site.resolve())
    assert "train:" in check_site(settings)


def test_client_refuses_an_unusable_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.dcm").write_bytes(b"not dicom")
    site = SiteConfig("h", str(empty), str(tmp_path / "state"))
    with pytest.raises(SiteDataError, match="no usable CT images"):
        check_site(NodeSettings(site, "srv:8000", None, None))

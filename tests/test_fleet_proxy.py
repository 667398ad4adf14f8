"""The nginx configuration `fedct server` writes: TLS on the public address, and only Flower's
Fleet routes (POST) forwarded to the SuperLink on loopback (test_trust_e2e.py runs it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fedct.server import fleet_proxy
from fedct.server.fleet_proxy import (
    ProxyConfig,
    ProxyMissingError,
    find_nginx,
    render,
    write_config,
)


def _config(tmp_path: Path, tls: bool = True) -> ProxyConfig:
    files = {n: tmp_path / n for n in ("server.pem", "server.key", "ca.crt")}
    return ProxyConfig(
        public_host="0.0.0.0",
        public_port=9100,
        upstream_port=9200,
        folder=tmp_path / "proxy",
        server_cert=files["server.pem"] if tls else None,
        server_key=files["server.key"] if tls else None,
        ca_cert=files["ca.crt"] if tls else None,
    )


def test_only_the_fleet_api_is_forwarded_over_tls(tmp_path: Path) -> None:
    text = render(_config(tmp_path))
    assert "listen 9100 ssl;" in text
    assert re.findall(r"location (\S+) \{", text) == ["/v1/fleet/", "/"]
    assert "proxy_pass https://superlink/v1/fleet/;" in text
    assert "server 127.0.0.1:9200;" in text  # the SuperLink, on loopback, connections kept
    assert text.count("proxy_pass") == 1  # nothing else reaches the SuperLink
    assert "location / { return 404; }" in text
    assert "limit_except POST { deny all; }" in text
    assert "proxy_ssl_verify on;" in text
    assert f"proxy_ssl_trusted_certificate {tmp_path / 'ca.crt'};" in text


def test_insecure_mode_proxies_plain_http(tmp_path: Path) -> None:
    text = render(_config(tmp_path, tls=False))
    assert "listen 9100;" in text
    assert "ssl" not in text
    assert "proxy_pass http://superlink/v1/fleet/;" in text


# `make test` installs nginx (like a server host's IT would), so this runs in CI
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tls=False)
    write_config(cfg)
    done = subprocess.run([*cfg.command(find_nginx()), "-t"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_missing_nginx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_proxy.shutil, "which", lambda _name: None)
    monkeypatch.setattr(fleet_proxy, "NGINX_PLACES", ("/nonexistent/nginx",))
    with pytest.raises(ProxyMissingError, match=r"apt-get install nginx-light.*--no-proxy"):
        find_nginx()

"""Only Flower's Fleet API faces the network: an nginx reverse proxy in front of the SuperLink.

Flower 1.41's SuperLink serves three APIs on one HTTP port: Fleet (``/v1/fleet/``, the only one
SuperNodes use), Control (``/v1/control/``: register nodes, submit and stop runs, read logs; the
open-source build authenticates nobody) and Runtime (``/v1/runtime/``: what a ServerApp
process uses). ``fedct server`` therefore binds the SuperLink to loopback and puts nginx on the
public address: it terminates the hospitals' TLS with the server certificate and forwards
``POST /v1/fleet/*`` - nothing else - to the SuperLink over TLS on loopback, checking the
SuperLink's certificate against FedCT's CA. Control and Runtime stay reachable from the server
host only, where `fedct server` registers the hospitals and submits the run.

nginx is a well-kept proxy from the operating system's packages; this module only writes its
configuration and finds the executable. SuperNode authentication is untouched: each request's
signature headers and body pass through unchanged.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fedct.common.errors import FedCTError

FLEET_PREFIX = "/v1/fleet/"
# where Debian, Ubuntu and RHEL put the executable; /usr/sbin is often not on a user's PATH
NGINX_PLACES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


class ProxyMissingError(FedCTError):
    """nginx, which `fedct server` needs to expose only the Fleet API, is not installed."""


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_PLACES if Path(p).is_file()), None)
    if found is None:
        raise ProxyMissingError(
            "fedct server exposes only Flower's Fleet API to the hospitals, through nginx, and "
            "nginx is not installed. Install it (Debian/Ubuntu: `apt-get install nginx-light`; "
            "RHEL/Fedora: `dnf install nginx`), or run with --no-proxy on a network that only "
            "the hospitals and this host can reach (the SuperLink's Control and Runtime APIs, "
            "which authenticate nobody, are then open on that port as well)."
        )
    return found


@dataclass(frozen=True)
class ProxyConfig:
    public_host: str
    public_port: int
    upstream_port: int  # the SuperLink's, on 127.0.0.1
    folder: Path  # nginx's prefix: its config, pid, logs and temporary files
    server_cert: Path | None = None  # None: plain HTTP (fedct server --insecure)
    server_key: Path | None = None
    ca_cert: Path | None = None

    @property
    def conf(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    def command(self, nginx: str) -> list[str]:
        # -p: every relative path (pid, temp folders) under our folder, not /var/lib/nginx;
        # -e: the startup error log there too (nginx writes it before reading the config)
        return [nginx, "-p", f"{self.folder}/", "-e", "error.log", "-c", str(self.conf)]


def _listen(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        return str(port)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def render(cfg: ProxyConfig) -> str:
    """nginx's configuration for ``cfg``: TLS on the public address, Fleet routes only."""
    tls = cfg.server_cert is not None
    scheme = "https" if tls else "http"
    listen = f"listen {_listen(cfg.public_host, cfg.public_port)}{' ssl' if tls else ''};"
    lines = [
        "daemon off;",  # fedct server owns the process: it stops it by its pid
        "worker_processes 1;",
        "pid nginx.pid;",
        "error_log error.log warn;",
        "events { worker_connections 256; }",
        "http {",
        # who, when (ms), which Fleet call, status, bytes each way and seconds taken
        '  log_format fleet \'$remote_addr [$time_iso8601 $msec] "$request" $status '
        "$request_length $body_bytes_sent $request_time';",
        "  access_log access.log fleet;",
        "  client_body_temp_path tmp/body;",
        "  proxy_temp_path tmp/proxy;",
        "  fastcgi_temp_path tmp/fastcgi;",
        "  uwsgi_temp_path tmp/uwsgi;",
        "  scgi_temp_path tmp/scgi;",
        "  server_tokens off;",
        # connections to the SuperLink are kept open and reused: without this nginx opens a
        # new one, TLS handshake and all, for every request (a model is ~20 of them)
        "  upstream superlink {",
        f"    server 127.0.0.1:{cfg.upstream_port};",
        "    keepalive 16;",
        "  }",
        "  server {",
        f"    {listen}",
    ]
    if tls:
        lines += [
            f"    ssl_certificate {cfg.server_cert};",
            f"    ssl_certificate_key {cfg.server_key};",
            "    ssl_protocols TLSv1.2 TLSv1.3;",
        ]
    lines += [
        # a model goes both ways in each round: no size cap, no buffering to disk
        "    client_max_body_size 0;",
        "    proxy_request_buffering off;",
        "    proxy_buffering off;",
        "    proxy_read_timeout 600s;",
        "    proxy_send_timeout 600s;",
        f"    location {FLEET_PREFIX} {{",
        "      limit_except POST { deny all; }",
        # a URI after the upstream: nginx forwards the *normalised* path (no ../ tricks)
        f"      proxy_pass {scheme}://superlink{FLEET_PREFIX};",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',  # keep the upstream connection open
    ]
    if tls:
        lines += [
            f"      proxy_ssl_trusted_certificate {cfg.ca_cert};",
            "      proxy_ssl_verify on;",
            "      proxy_ssl_server_name on;",
            "      proxy_ssl_name localhost;",  # fedct certs always puts localhost in the SANs
        ]
    lines += [
        "    }",
        "    location / { return 404; }",  # Control, Runtime and anything else: not here
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def write_config(cfg: ProxyConfig) -> Path:
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (cfg.folder / sub).mkdir(parents=True, exist_ok=True)
    cfg.conf.write_text(render(cfg))
    return cfg.conf

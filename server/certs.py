"""The federation's credentials: a CA, the SuperLink's TLS certificate, one key pair per hospital.

Layout of the folder ``fedct certs`` writes (what to hand to whom is in :func:`handout`):

    ca.crt, ca.key            the federation's certificate authority (ca.key stays offline)
    server.crt, server.key    the SuperLink's TLS certificate, signed by the CA
    hospitals/NAME.key        a hospital's SuperNode authentication key (EC P-384, OpenSSH)
    hospitals/NAME.pub        its public half, registered on the SuperLink

Written with the ``cryptography`` package (which Flower itself uses for these keys); Flower
documents the same files made with shell scripts around openssl/ssh-keygen.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedct.common.errors import ConfigError
from fedct.common.fileio import atomic_write_text

HOSPITALS = "hospitals"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertPaths:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def hospital_key(self, name: str) -> Path:
        return self.folder / HOSPITALS / f"{name}.key"

    def hospital_public_key(self, name: str) -> Path:
        return self.folder / HOSPITALS / f"{name}.pub"

    def hospitals(self) -> list[str]:
        return sorted(p.stem for p in (self.folder / HOSPITALS).glob("*.pub"))

    def require_server_files(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"missing {', '.join(str(p) for p in missing)}: create the federation's "
                f"certificates with `fedct certs --out {self.folder} --hospital NAME ...` "
                "(or pass --insecure for a test on a trusted network)"
            )


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(
            f"invalid hospital name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def create(
    folder: Path, hospitals: list[str], server_names: list[str], *, days: int = 825
) -> list[Path]:
    """Create what is missing in ``folder``; returns the files written.

    Existing files are never overwritten: a hospital's key or the CA replaced by mistake would
    lock sites out. Adding a hospital later reuses the CA.
    """
    paths = CertPaths(folder)
    for name in hospitals:
        check_name(name)
    written: list[Path] = []
    if paths.ca_cert.exists() != paths.ca_key.exists():
        raise ConfigError(f"{folder} has only one of ca.crt and ca.key; restore the other")
    if not paths.ca_cert.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _ca_certificate(ca_key, days)
        _write_key(paths.ca_key, ca_key)
        _write_cert(paths.ca_cert, ca_cert)
        written += [paths.ca_cert, paths.ca_key]
    ca_key = _load_key(paths.ca_key)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    if not paths.server_cert.exists():
        server_key = ec.generate_private_key(ec.SECP384R1())
        cert = _server_certificate(server_key, ca_key, ca_cert, server_names, days)
        _write_key(paths.server_key, server_key)
        _write_cert(paths.server_cert, cert)
        written += [paths.server_cert, paths.server_key]
    for name in hospitals:
        if paths.hospital_key(name).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        paths.hospital_key(name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths.hospital_key(name), private.decode(), mode=0o600)
        atomic_write_text(
            paths.hospital_public_key(name), f"{public.decode()} {name}\n", mode=0o644
        )
        written += [paths.hospital_key(name), paths.hospital_public_key(name)]
    return written


def server_names_of(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses the SuperLink certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedCT federation CA")])
    return (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    days: int,
) -> x509.Certificate:
    names = list(dict.fromkeys([*names, "localhost", "127.0.0.1", "::1"]))
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pem.decode(), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_text(path, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key

"""Closed runs without a server: the run's CA, peers' admissions, and checking a certificate.

The run's owner makes a CA once (`p2pdiloco keygen --run DIR`: an EC P-256 key, `ca.key`, mode
0600, and a self-signed certificate, `ca.pem`). A peer makes its own keys (`p2pdiloco keygen --peer
DIR`): its libp2p identity (`identity.key`, which fixes its peer id), a TLS key (`peer.key`, 0600)
and a certificate request (`peer.csr`) whose common name is that peer id. The owner admits it
(`p2pdiloco admit --ca RUNDIR --request DIR/peer.csr --out DIR/peer.pem --days N`): a certificate
signed by the run's CA that binds the peer id to the peer's TLS key, valid for N days, written with
the run's CA certificate beside it (`run-ca.pem`). The peer then runs with `--admission DIR`.

Every certificate names the same DNS name, `SERVER_NAME`: peers are dialled by IP address, so TLS
checks that name (grpc.ssl_target_name_override, ssl's server_hostname) and the run's CA, while the
peer id, the common name, is what every plane checks against the caller (trust.py).

Revocation: certificates are short-lived (`--days`, default 30) and a peer refuses every peer id
listed in its `--revoked FILE` (one peer id per line, `#` comments), a file it reads again whenever
it changes. Nothing is online: the owner re-admits peers before their certificates expire and hands
out the revoked list as it hands out admissions.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "p2pdiloco-peer"  # in every peer certificate's SAN; peers are addressed by IP
CA_KEY, CA_CERT = "ca.key", "ca.pem"
PEER_KEY, PEER_CSR, PEER_CERT, PEER_CA, PEER_IDENTITY = "peer.key", "peer.csr", "peer.pem", "run-ca.pem", "identity.key"
DEFAULT_DAYS = 30
_CLOCK_SKEW = dt.timedelta(minutes=5)  # a certificate is valid from 5 minutes before it was issued
_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")  # base58, as libp2p writes peer ids
REVOKED_RECHECK_S = 2.0  # how often a revoked list's file is looked at for changes


class AdmissionError(ValueError):
    """A missing, expired, foreign, revoked or mismatched admission: the message says which."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:  # created 0600, never readable by others even for a moment
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdmissionError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# ---- the owner's side: the run CA and admitting peers
def make_run_ca(run_dir: str | Path, name: str = "p2pdiloco run", days: int = 3650) -> Path:
    """A new run CA in run_dir (ca.key 0600, ca.pem); refuses to overwrite one."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / CA_KEY).exists():
        raise AdmissionError(f"{run_dir / CA_KEY} exists already: a run has one CA (remove it to start a new run)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - _CLOCK_SKEW)
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(run_dir / CA_KEY, _key_pem(key), private=True)
    _write(run_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return run_dir / CA_CERT


def load_ca(run_dir: str | Path):
    """(CA private key, CA certificate) of run_dir."""
    run_dir = Path(run_dir)
    try:
        key = serialization.load_pem_private_key(_read(run_dir / CA_KEY, "the run's CA key"), password=None)
        cert = x509.load_pem_x509_certificate(_read(run_dir / CA_CERT, "the run's CA certificate"))
    except ValueError as exc:
        raise AdmissionError(f"{run_dir} does not hold a run CA made by `p2pdiloco keygen --run`: {exc}") from None
    return key, cert


def issue(ca_key, ca_cert, peer_id: str, public_key, days: float, start: dt.datetime | None = None) -> x509.Certificate:
    """A certificate for `peer_id` (its common name) and `public_key`, valid for `days` from
    `start` (default: now)."""
    start = start or _now()
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)]))
            .issuer_name(ca_cert.subject).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start - _CLOCK_SKEW).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))


def admit(run_dir: str | Path, request: str | Path, out: str | Path, days: float = DEFAULT_DAYS) -> str:
    """Sign a peer's request with the run CA: the certificate goes to `out`, the CA's certificate
    beside it (run-ca.pem). Returns the admitted peer id."""
    if not days > 0:
        raise AdmissionError(f"--days must be positive, got {days}")
    ca_key, ca_cert = load_ca(run_dir)
    try:
        csr = x509.load_pem_x509_csr(_read(Path(request), "the peer's request"))
    except ValueError as exc:
        raise AdmissionError(f"{request} is not a certificate request made by `p2pdiloco keygen --peer`: {exc}") from None
    if not csr.is_signature_valid:
        raise AdmissionError(f"{request}: the request's signature is invalid (a damaged or forged file)")
    peer_id = _common_name(csr.subject)
    if not _PEER_ID.match(peer_id or ""):
        raise AdmissionError(f"{request} names '{peer_id}', which is not a libp2p peer id")
    cert = issue(ca_key, ca_cert, peer_id, csr.public_key(), days)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, cert.public_bytes(serialization.Encoding.PEM))
    _write(out.parent / PEER_CA, ca_cert.public_bytes(serialization.Encoding.PEM))
    return peer_id


# ---- the peer's side: its keys and request, and its admission
def identity_peer_id(identity_path: str | Path) -> str:
    """The libp2p peer id of a hivemind identity file."""
    from hivemind.p2p import PeerID
    try:
        return str(PeerID.from_identity(Path(identity_path).read_bytes()))
    except OSError as exc:
        raise AdmissionError(f"cannot read the identity file {identity_path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise AdmissionError(f"{identity_path} is not a libp2p identity file: {exc}") from None


def make_peer_request(peer_dir: str | Path, identity_path: str | Path | None = None) -> str:
    """A peer's identity (made if missing), TLS key and certificate request in peer_dir; its peer id."""
    from hivemind.p2p import P2P
    peer_dir = Path(peer_dir)
    peer_dir.mkdir(parents=True, exist_ok=True)
    identity = Path(identity_path) if identity_path else peer_dir / PEER_IDENTITY
    if not identity.exists():
        P2P.generate_identity(str(identity))
    peer_id = identity_peer_id(identity)
    if (peer_dir / PEER_KEY).exists():
        key = serialization.load_pem_private_key(_read(peer_dir / PEER_KEY, "this peer's TLS key"), password=None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(peer_dir / PEER_KEY, _key_pem(key), private=True)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])).sign(key, hashes.SHA256()))
    _write(peer_dir / PEER_CSR, csr.public_bytes(serialization.Encoding.PEM))
    return peer_id


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


class RevokedList:
    """Peer ids the run no longer admits: a text file, one per line, read again when it changes."""

    def __init__(self, path: str = ""):
        self.path, self.ids, self._seen, self._checked = path, frozenset(), None, 0.0
        if path:
            self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size) != self._seen:
                lines = Path(self.path).read_text().splitlines()
                self.ids = frozenset(s for s in (line.split("#", 1)[0].strip() for line in lines) if s)
                self._seen = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            if self._seen is None:  # at start a missing list is an error; later the last one read stays
                raise AdmissionError(f"cannot read the revoked list {self.path}: {exc.strerror or exc}") from None

    def __contains__(self, peer_id: str) -> bool:
        if self.path and time.monotonic() - self._checked > REVOKED_RECHECK_S:
            self._checked = time.monotonic()
            self._load()
        return peer_id in self.ids


class Verifier:
    """Checks other peers' certificates: signed by the run CA, in their validity period, not
    revoked; gives the peer id each names. Verified certificates are remembered by digest (their
    dates and the revoked list are checked again every time)."""

    def __init__(self, ca_pem: bytes, revoked: RevokedList | None = None):
        self.ca_pem = ca_pem
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self.revoked = revoked or RevokedList()
        self._known: dict[bytes, tuple[str, dt.datetime, dt.datetime, object]] = {}

    def verify(self, cert_der: bytes) -> tuple[str, object]:
        """(peer id, the certificate's public key); AdmissionError saying what is wrong."""
        digest = hashlib.sha256(cert_der).digest()
        known = self._known.get(digest)
        if known is None:
            if not cert_der:
                raise AdmissionError("no admission certificate: this is a closed run")
            try:
                cert = x509.load_der_x509_certificate(cert_der)
                cert.verify_directly_issued_by(self.ca)
            except (ValueError, TypeError, InvalidSignature):
                raise AdmissionError("the certificate is not signed by this run's CA") from None
            peer_id = _common_name(cert.subject)
            if peer_id is None:
                raise AdmissionError("the certificate names no peer id")
            known = (peer_id, cert.not_valid_before_utc, cert.not_valid_after_utc, cert.public_key())
            if len(self._known) > 4096:  # bounded: a stranger cannot grow it (only CA-signed ones get here)
                self._known.clear()
            self._known[digest] = known
        peer_id, start, end, key = known
        now = _now()
        if not start <= now <= end:
            raise AdmissionError(f"the certificate of {peer_id} is not valid now (valid {start:%Y-%m-%d %H:%M} to "
                                 f"{end:%Y-%m-%d %H:%M} UTC)")
        if peer_id in self.revoked:
            raise AdmissionError(f"peer {peer_id} is revoked from this run")
        return peer_id, key


@dataclass(frozen=True)
class Admission:
    """This peer's admission to a closed run (loaded by `load_admission`)."""
    peer_id: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    identity_path: str
    revoked_path: str = ""

    @property
    def cert_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    def verifier(self) -> Verifier:
        return Verifier(self.ca_pem, RevokedList(self.revoked_path))


def load_admission(admission_dir: str, identity_path: str = "", revoked_path: str = "") -> Admission:
    """Load and check this peer's admission up front: AdmissionError (exit status 2) names what
    is missing or wrong: the files, the CA's signature, the dates, the peer id, revocation."""
    d = Path(admission_dir)
    if not d.is_dir():
        raise AdmissionError(f"--admission {d}: no such folder; make it with `p2pdiloco keygen --peer {d}` and have "
                             f"the run's owner admit it (`p2pdiloco admit`)")
    identity = identity_path or str(d / PEER_IDENTITY)
    if not (d / PEER_CERT).exists():
        raise AdmissionError(f"{d / PEER_CERT} is missing: this peer is not admitted yet; send {d / PEER_CSR} to "
                             f"the run's owner, who runs `p2pdiloco admit --ca RUNDIR --request peer.csr --out peer.pem`")
    ca_pem, key_pem = _read(d / PEER_CA, "the run's CA certificate"), _read(d / PEER_KEY, "this peer's TLS key")
    cert_pem = _read(d / PEER_CERT, "this peer's certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        verifier = Verifier(ca_pem, RevokedList(revoked_path))
    except ValueError as exc:
        raise AdmissionError(f"--admission {d}: a damaged file ({exc})") from None
    try:
        peer_id, public_key = verifier.verify(cert.public_bytes(serialization.Encoding.DER))
    except AdmissionError as exc:
        raise AdmissionError(f"--admission {d}: {exc}; ask the run's owner for a new admission") from None
    if public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise AdmissionError(f"--admission {d}: {PEER_CERT} was not issued for {PEER_KEY} (files of two admissions mixed)")
    mine = identity_peer_id(identity)
    if mine != peer_id:
        raise AdmissionError(f"--admission {d}: the certificate admits peer {peer_id}, but this peer's identity "
                             f"{identity} is peer {mine}; run with the identity the request was made with")
    return Admission(peer_id, ca_pem, cert_pem, key_pem, identity, revoked_path)


def throwaway_run(peer_ids: list[str], days: float = 1.0) -> list[Admission]:
    """A run CA made in memory and an admission for each of `peer_ids` (any names): for benchmarks
    (bench allreduce's `_auth` methods) and tests, where no libp2p identity is involved."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pdiloco throwaway run CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(_now() - _CLOCK_SKEW)
          .not_valid_after(_now() + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    out = []
    for peer_id in peer_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(ca_key, ca, peer_id, key.public_key(), days)
        out.append(Admission(peer_id, ca.public_bytes(serialization.Encoding.PEM),
                             cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), ""))
    return out

"""What a closed run's peer checks on every plane (docs/swarm.md, "Closed runs"; admission.py has
the certificates themselves).

- gRPC: mutual TLS with the run's CA; the caller's certificate comes from the call's auth context.
- the bulk port: TLS (Python's ssl) with the same certificates, a client certificate required, for
  the handshake of each connection (bulk_seal.py); its messages are then sealed with AES-GCM.
- libp2p streams: Noise proves the remote peer id; the caller's certificate travels in the request
  (`Caller.cert`) and must be signed by the run's CA and name that peer id.
- the DHT: records signed with an admitted key (signed_records.py).
On every plane the certificate's peer id must be the caller's `peer_id` (an admitted peer cannot
speak for another) and not be revoked. A refusal answers the caller with UNAUTHENTICATED or
PERMISSION_DENIED and is logged at most once per `LOG_EVERY_S` per caller, so a stranger's attempts
cost an honest peer a TLS handshake each (bounded by bulk.CONNECT_TIMEOUT_S on the bulk port) and
no log flood.
"""
from __future__ import annotations

import logging
import ssl
import time

import grpc

from .admission import SERVER_NAME, Admission, AdmissionError

log = logging.getLogger("p2pdiloco.trust")

LOG_EVERY_S = 10.0


def tls_peer(peercert: dict | None) -> str | None:
    """The peer id in a verified TLS peer's certificate, as ssl's getpeercert() gives it."""
    if not peercert:
        return None
    names = [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return names[0] if len(names) == 1 else None


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Trust:
    """A closed run's credentials (this peer's admission) and checks (the run's CA, revocation)."""

    def __init__(self, admission: Admission, bulk_encryption: str = "aes-gcm"):
        self.admission, self.bulk_encryption = admission, bulk_encryption  # bulk_seal.py's modes
        self.verifier = admission.verifier()
        self.cert_der = admission.cert_der
        self._logged: dict[str, float] = {}
        a = admission  # one set of channel credentials for every channel this peer opens
        self._channel_credentials = grpc.ssl_channel_credentials(root_certificates=a.ca_pem, private_key=a.key_pem,
                                                                 certificate_chain=a.cert_pem)

    # ---- credentials for each transport
    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        a = self.admission
        return grpc.ssl_server_credentials([(a.key_pem, a.cert_pem)], root_certificates=a.ca_pem,
                                           require_client_auth=True)

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        return self._channel_credentials

    @staticmethod
    def grpc_channel_options() -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", SERVER_NAME)]

    def _ssl_context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        import tempfile
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.admission.ca_pem.decode())
        # ssl loads a key pair from files only: write them to a private temporary file and drop it.
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
            f.write(self.admission.cert_pem + b"\n" + self.admission.key_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
        ctx.verify_mode = ssl.CERT_REQUIRED
        if purpose is ssl.Purpose.CLIENT_AUTH:
            ctx.num_tickets = 0  # every bulk connection makes a fresh handshake: tickets would go unused
        else:
            ctx.check_hostname = True  # SERVER_NAME, which every admitted peer's certificate holds
        return ctx

    def server_ssl(self) -> ssl.SSLContext:
        return self._ssl_context(ssl.Purpose.CLIENT_AUTH)

    def client_ssl(self) -> ssl.SSLContext:
        return self._ssl_context(ssl.Purpose.SERVER_AUTH)

    # ---- who is calling
    def grpc_peer(self, context) -> str:
        """The peer id in the certificate of a gRPC call's client (TLS verified it against the run's CA)."""
        names = (context.auth_context() or {}).get("x509_common_name") or []
        if len(names) != 1:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no admission certificate: this is a closed run")
        return names[0].decode(errors="replace")


    def libp2p_peer(self, caller, remote_id: str) -> str:
        """The caller's certificate (in the request) must be the run's and name the stream's peer id."""
        try:
            peer_id, _ = self.verifier.verify(caller.cert)
        except AdmissionError as exc:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if peer_id != remote_id:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"the certificate admits {peer_id}, but the stream comes from {remote_id}")
        return peer_id

    def check(self, caller, peer_id: str | None) -> None:
        """`peer_id`, proven by the transport, is admitted and is who the call says it is."""
        if peer_id is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no admission certificate: this is a closed run")
        if peer_id in self.verifier.revoked:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"peer {peer_id} is revoked from this run")
        if caller.peer_id != peer_id:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"the caller says it is {caller.peer_id or '?'}, but its certificate admits {peer_id}")

    def log_refusal(self, where: str, who: str, why: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(who, -LOG_EVERY_S) >= LOG_EVERY_S:
            if len(self._logged) > 1024:
                self._logged.clear()
            self._logged[who] = now
            log.warning("refused a %s call from %s: %s", where, who, why)

"""A closed run's DHT records: each signed by an admitted peer, for its own subkey only.

`AdmissionValidator` is a hivemind record validator (hivemind.dht.validation), run inside the DHT's
process: it signs every record this peer stores, and every record this DHT node is asked to store
or is handed by another node must carry a certificate of the run's CA that names the record's
subkey (a peer id: the control plane files everything under the writer's peer id) and a valid
signature by that certificate's key over (key, subkey, value, expiration). So a stranger's
writes, and an admitted peer's writes under another peer's subkey, are dropped by every honest
node, and a reply that holds one is ignored whole (hivemind's rule for a dictionary).

A signed value is the msgpack list `[MARK, value (the serialized original), cert (DER), signature]`:
an open peer's DHT reads it as that list, which control.py recognizes as a closed run's record.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from .records import MARK, is_signed  # noqa: F401 (MARK: part of this module's format)
from .admission import Admission, AdmissionError

log = logging.getLogger("p2pdiloco.trust")

LOG_EVERY_S = 30.0


def _signed_bytes(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps((b"p2pdiloco-record", record.key, record.subkey, record.value,
                                    record.expiration_time))


class AdmissionValidator(RecordValidatorBase):
    def __init__(self, admission: Admission):
        self.admission = admission
        self.verifier = admission.verifier()
        self.cert_der = admission.cert_der
        self.key = serialization.load_pem_private_key(admission.key_pem, password=None)
        self._logged = 0.0

    def sign_value(self, record: DHTRecord) -> bytes:
        signature = self.key.sign(_signed_bytes(record), ec.ECDSA(hashes.SHA256()))
        return MSGPackSerializer.dumps([MARK, record.value, self.cert_der, signature])

    @staticmethod
    def _split(value: bytes) -> tuple[bytes, bytes, bytes] | None:
        """(value, cert, signature) of a signed value; None if it is not one."""
        try:
            parts = MSGPackSerializer.loads(value)
        except Exception:
            return None
        if not (is_signed(parts) and all(isinstance(p, bytes) for p in parts[1:])):
            return None
        return parts[1], parts[2], parts[3]

    def strip_value(self, record: DHTRecord) -> bytes:
        parts = self._split(record.value)
        return record.value if parts is None else parts[0]

    def validate(self, record: DHTRecord) -> bool:
        why = self._refusal(record)
        if why is not None:
            now = time.monotonic()
            if now - self._logged >= LOG_EVERY_S:  # strangers' writes must not flood the log
                self._logged = now
                log.warning("DHT: ignored a record that is not an admitted peer's own (%s); more are not logged "
                            "for %.0fs", why, LOG_EVERY_S)
        return why is None

    def _refusal(self, record: DHTRecord) -> str | None:
        parts = self._split(record.value)
        if parts is None:
            return "unsigned"
        value, cert, signature = parts
        try:
            peer_id, public_key = self.verifier.verify(cert)
        except AdmissionError as exc:
            return str(exc)
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:
            subkey = None
        if subkey != peer_id:
            return f"{peer_id} wrote under subkey {subkey!r}"
        try:
            public_key.verify(signature, _signed_bytes(dataclasses.replace(record, value=value)),
                              ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, TypeError, ValueError):
            return f"bad signature for {peer_id}"
        return None

    @property
    def priority(self) -> int:
        return 10  # validated first, before any validator that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, AdmissionValidator)

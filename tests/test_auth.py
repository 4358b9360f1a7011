"""Closed runs (docs/swarm.md, "Closed runs"): admissions, and every plane refusing strangers.

The unit part checks keygen/admit/load_admission and the DHT record validator; the transport part
runs real servers on loopback sockets in this process (gRPC and the bulk port with mutual TLS); the
swarm part (test_auth_swarm.py) runs real peer processes and a stranger against them.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from p2pdiloco.swarm import admission as adm
from p2pdiloco.swarm.admission import AdmissionError, admit, load_admission, make_peer_request, make_run_ca

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run CA and two peers' folders, one admitted (made once: identities are RSA keys)."""
    root = tmp_path_factory.mktemp("closed-run")
    make_run_ca(root / "run")
    ids = {name: make_peer_request(root / name) for name in ("a", "b")}
    admit(root / "run", root / "a" / "peer.csr", root / "a" / "peer.pem", days=1)
    return root, ids


def test_keygen_and_admit_make_an_admission_that_loads(run):
    root, ids = run
    assert stat.S_IMODE(os.stat(root / "run" / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "a" / "peer.key").st_mode) == 0o600
    a = load_admission(str(root / "a"))
    assert a.peer_id == ids["a"] and a.identity_path == str(root / "a" / "identity.key")
    cert = x509.load_pem_x509_certificate(a.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [adm.SERVER_NAME]
    with pytest.raises(AdmissionError, match="exists already"):
        make_run_ca(root / "run")  # a run's CA is never overwritten


def test_a_peer_without_its_certificate_is_told_to_ask_the_owner(run):
    root, _ = run
    with pytest.raises(AdmissionError, match="not admitted yet.*p2pdiloco admit"):
        load_admission(str(root / "b"))
    with pytest.raises(AdmissionError, match="no such folder"):
        load_admission(str(root / "nowhere"))


def test_expired_foreign_wrong_peer_and_revoked_admissions_are_refused(run, tmp_path):
    root, ids = run
    ca_key, ca_cert = adm.load_ca(root / "run")
    csr = x509.load_pem_x509_csr((root / "b" / "peer.csr").read_bytes())
    d = tmp_path / "b"
    d.mkdir()
    for name in ("identity.key", "peer.key"):
        (d / name).write_bytes((root / "b" / name).read_bytes())
    (d / "run-ca.pem").write_bytes((root / "run" / "ca.pem").read_bytes())

    def install(cert):
        (d / "peer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    yesterday = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    install(adm.issue(ca_key, ca_cert, ids["b"], csr.public_key(), days=1, start=yesterday))  # expired
    with pytest.raises(AdmissionError, match="not valid now"):
        load_admission(str(d))
    make_run_ca(tmp_path / "other")  # another run's CA, even under the same name
    other_key, other_cert = adm.load_ca(tmp_path / "other")
    install(adm.issue(other_key, other_cert, ids["b"], csr.public_key(), days=1))
    with pytest.raises(AdmissionError, match="not signed by this run's CA"):
        load_admission(str(d))
    install(adm.issue(ca_key, ca_cert, ids["a"], csr.public_key(), days=1))  # names another peer id
    with pytest.raises(AdmissionError, match=f"admits peer {ids['a']}, but this peer's identity"):
        load_admission(str(d))
    install(adm.issue(ca_key, ca_cert, ids["b"], csr.public_key(), days=1))
    assert load_admission(str(d)).peer_id == ids["b"]
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"# dropped\n{ids['b']}\n")
    with pytest.raises(AdmissionError, match="revoked"):
        load_admission(str(d), revoked_path=str(revoked))
    # Another peer's key with this certificate: files of two admissions mixed.
    (d / "peer.key").write_bytes((root / "a" / "peer.key").read_bytes())
    with pytest.raises(AdmissionError, match="not issued for peer.key"):
        load_admission(str(d))


def test_admit_refuses_a_request_that_does_not_name_a_peer_id(run, tmp_path):
    root, _ = run
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a peer id!")])).sign(key, hashes.SHA256()))
    (tmp_path / "x.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(AdmissionError, match="not a libp2p peer id"):
        admit(root / "run", tmp_path / "x.csr", tmp_path / "x.pem")


def test_the_peer_command_exits_2_saying_what_the_admission_lacks(run, capsys):
    from p2pdiloco.cli import main
    root, _ = run
    assert main(["peer", "--admission", str(root / "b"), "--model", "tiny"]) == 2
    assert "not admitted yet" in capsys.readouterr().err
    assert main(["peer", "--revoked", "x.txt", "--model", "tiny"]) == 2
    assert "swarm.revoked_path is for closed runs" in capsys.readouterr().err


# ---- DHT records (signed_records.py)
def test_records_are_accepted_only_signed_by_an_admitted_peer_for_its_own_subkey():
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from p2pdiloco.swarm.signed_records import AdmissionValidator
    a, b = adm.throwaway_run(["peerA", "peerB"])
    (foreign,) = adm.throwaway_run(["peerA"])  # same name, another CA
    va, vb, vf = AdmissionValidator(a), AdmissionValidator(b), AdmissionValidator(foreign)

    def record(subkey, value=b"v", expiration=1e10):
        return DHTRecord(b"k" * 20, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)

    r = record("peerA")
    signed = DHTRecord(r.key, r.subkey, va.sign_value(r), r.expiration_time)
    assert vb.validate(signed) and vb.strip_value(signed) == r.value
    assert not vb.validate(r)  # unsigned
    mine_for_b = record("peerB")
    assert not vb.validate(DHTRecord(mine_for_b.key, mine_for_b.subkey, va.sign_value(mine_for_b), 1e10))
    assert not vb.validate(DHTRecord(r.key, r.subkey, signed.value, r.expiration_time + 1))  # expiry pushed
    marker, _, cert, sig = MSGPackSerializer.loads(signed.value)
    tampered = MSGPackSerializer.dumps([marker, MSGPackSerializer.dumps(b"w"), cert, sig])
    assert vb.validate(DHTRecord(r.key, r.subkey, MSGPackSerializer.dumps([marker, r.value, cert, sig]), 1e10))
    assert not vb.validate(DHTRecord(r.key, r.subkey, tampered, r.expiration_time))
    assert not vb.validate(DHTRecord(r.key, r.subkey, vf.sign_value(r), r.expiration_time))  # another CA


# ---- the data plane, in this process over loopback sockets
class _Peer:
    """A data plane as a peer serves it (Servers + Channels), with or without admission."""

    def __init__(self, name: str, admission=None, revoked: str = "", encryption: str = "aes-gcm"):
        from p2pdiloco.swarm.dataplane import Identity, RoundBook, Servicer
        from p2pdiloco.swarm.trust import Trust
        if admission is not None and revoked:
            admission = adm.Admission(admission.peer_id, admission.ca_pem, admission.cert_pem, admission.key_pem,
                                      "", revoked)
        self.trust = None if admission is None else Trust(admission, encryption)
        self.identity = Identity("r", "h", name, "fp32", self.trust.cert_der if self.trust else b"")
        self.book = RoundBook(self.identity, reduce_timeout_s=5)
        self.servicer = Servicer(self.book, self._state, self.trust)

    @staticmethod
    async def _state(fragments):
        return b"the model"

    async def start(self):
        from p2pdiloco.swarm.channels import Channels
        from p2pdiloco.swarm.servers import Servers, address
        self.channels = Channels(1 << 24, self.trust)
        self.servers = Servers(self.servicer, 1 << 24, 5)
        port, bulk = await self.servers.start("127.0.0.1", 0, 0)
        self.address, self.grpc_address, self.bulk_port = address("127.0.0.1", port, bulk), f"127.0.0.1:{port}", bulk
        return self

    async def stop(self):
        await self.servers.stop()
        await self.channels.close()


def _reduce_request(caller, payload=b""):
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb
    return pb.ReduceRequest(caller=caller, kind="fragment", index=0, round=7, group_id=b"g", weight=1.0,
                            payload=payload)


def _run(coro):
    import uvloop
    return uvloop.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("modes", [("aes-gcm", "aes-gcm"), ("none", "none"), ("none", "aes-gcm")])
def test_admitted_peers_average_over_tls_on_the_bulk_port_and_grpc(modes):
    """Both bulk encryption modes (bulk_seal.py), and a peer that asks for none with one that does
    not: that pair seals (counted by each connection's message counters)."""
    from p2pdiloco.averaging import SyncKey
    from p2pdiloco.codecs import get_codec
    from p2pdiloco.swarm.dataplane import allreduce
    from p2pdiloco.swarm.matchmaking import make_group
    a_adm, b_adm = adm.throwaway_run(["peer-a", "peer-b"])
    # 2.4 MB vectors: each peer's span is more than one of bulk_seal.SCRATCH's pieces
    x = {"peer-a": torch.randn(600_000), "peer-b": torch.randn(600_000)}

    async def main():
        peers = [await _Peer("peer-a", a_adm, encryption=modes[0]).start(),
                 await _Peer("peer-b", b_adm, encryption=modes[1]).start()]
        try:
            for r, grpc_only in ((1, False), (2, True)):
                declared = {p.identity.peer_id: p.grpc_address if grpc_only else p.address for p in peers}
                results = await asyncio.gather(*(allreduce(
                    p.book, p.channels, make_group(SyncKey("fragment", 0, r), declared, p.identity.peer_id, 2),
                    get_codec("fp32").encode(x[p.identity.peer_id]), 1.0, 5) for p in peers))
                for res in results:
                    torch.testing.assert_close(res.mean, (x["peer-a"] + x["peer-b"]) / 2)
                    assert res.participants == ("peer-a", "peer-b")
            for p in peers:  # the bulk port was used, after its TLS handshake, not fallen back from
                assert not p.channels.bulk.unreachable_until
                (conn,) = [c for conns in p.channels.bulk.idle.values() for c in conns]
                if "aes-gcm" in modes:
                    assert conn.seal is not None and conn.seal.sent == 2 and conn.seal.received == 2
                else:
                    assert conn.seal is None
        finally:
            for p in peers:
                await p.stop()

    _run(main())


def test_strangers_impostors_and_revoked_peers_are_refused_on_grpc_and_the_bulk_port(tmp_path):
    from p2pdiloco.swarm.bulk import BulkError, BulkUnreachable
    from p2pdiloco.swarm.bulk_caller import BulkPool
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb
    from p2pdiloco.swarm.gen import p2pdiloco_pb2_grpc as pb_grpc
    from p2pdiloco.swarm.state import StateError, download_state
    from p2pdiloco.swarm.trust import Trust
    from p2pdiloco.swarm.wire import REQUEST_PAYLOAD, with_payload
    owner_adm, c_adm, d_adm = adm.throwaway_run(["owner", "peer-c", "peer-d"])
    (foreign_adm,) = adm.throwaway_run(["peer-c"])
    revoked = tmp_path / "revoked"
    revoked.write_text("peer-d\n")

    async def main():
        owner = await _Peer("owner", owner_adm, str(revoked)).start()
        host, bulk = "127.0.0.1", owner.bulk_port
        c = _Peer("peer-c", c_adm)
        try:
            stranger = pb.Caller(run_id="r", protocol=3, config_hash="h", peer_id="stranger")
            impostor = pb.Caller(run_id="r", protocol=3, config_hash="h", peer_id="owner", cert=c.trust.cert_der)
            message = lambda caller: with_payload(_reduce_request(caller).SerializeToString(), REQUEST_PAYLOAD, [])

            # No credentials: no TLS handshake, no call, on either port.
            open_channel = grpc.aio.insecure_channel(owner.grpc_address)
            for call in (pb_grpc.AveragingStub(open_channel).Reduce(_reduce_request(stranger), timeout=5),
                         pb_grpc.AveragingStub(open_channel).Probe(pb.ProbeRequest(caller=stranger), timeout=5)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(StateError, match="UNAVAILABLE"):
                await download_state(pb_grpc.AveragingStub(open_channel), stranger, 5, 1 << 20)
            await open_channel.close()
            with pytest.raises(BulkUnreachable):
                await BulkPool(1 << 24).call(host, bulk, message(stranger), 5)

            # A certificate of another CA (the stranger knows the run's CA certificate: it is public).
            foreign = Trust(foreign_adm)
            creds = grpc.ssl_channel_credentials(owner_adm.ca_pem, foreign_adm.key_pem, foreign_adm.cert_pem)
            channel = grpc.aio.secure_channel(owner.grpc_address, creds, options=Trust.grpc_channel_options())
            with pytest.raises(StateError, match="UNAVAILABLE"):
                await download_state(pb_grpc.AveragingStub(channel), stranger, 5, 1 << 20)
            await channel.close()
            ctx = foreign.client_ssl()
            ctx.check_hostname, ctx.verify_mode = False, 0  # the stranger trusts anyone: the owner must refuse
            with pytest.raises(BulkUnreachable):
                await BulkPool(1 << 24, ctx).call(host, bulk, message(stranger), 5)

            # An admitted peer speaking for another is refused; so is a revoked one.
            await c.start()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.channels.stub(owner.grpc_address).Reduce(_reduce_request(impostor), timeout=5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admits peer-c" in err.value.details()
            with pytest.raises(BulkError) as err:
                await c.channels.bulk.call(host, bulk, message(impostor), 5)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(StateError, match="PERMISSION_DENIED"):
                await download_state(c.channels.stub(owner.grpc_address), impostor, 5, 1 << 20)
            d = await _Peer("peer-d", d_adm).start()
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await d.channels.stub(owner.grpc_address).Probe(pb.ProbeRequest(caller=d.identity.caller()), timeout=5)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
            finally:
                await d.stop()
            # ... while the admitted peer, as itself, is served (a ping, and the state).
            reply = await c.channels.stub(owner.grpc_address).Probe(pb.ProbeRequest(caller=c.identity.caller()), timeout=5)
            assert reply.reachable and reply.detail == "owner"
            assert await download_state(c.channels.stub(owner.grpc_address), c.identity.caller(), 5, 1 << 20) == b"the model"
        finally:
            if c.__dict__.get("servers"):
                await c.stop()
            await owner.stop()

    _run(main())


@pytest.mark.timeout(400)  # four methods, each its own peer processes
def test_bench_allreduce_auth_runs_each_p2pdiloco_method_closed_too(tmp_path):
    """`--auth`: each p2pdiloco method's closed twins (METHOD_auth: the bulk port's messages sealed;
    METHOD_auth-plain: plain after the handshake) right after it, with the same means; a closed
    method named on its own runs alone."""
    import json

    from p2pdiloco.bench_allreduce import run_allreduce_bench
    res = run_allreduce_bench(2, 600_000, str(tmp_path / "a.json"), repeats=1,
                              methods=("p2pdiloco_fp32", "p2pdiloco_grpc_e3m0_auth"), progress=lambda _: None, auth=True)
    assert list(res["methods"]) == ["p2pdiloco_fp32", "p2pdiloco_fp32_auth", "p2pdiloco_fp32_auth-plain",
                                    "p2pdiloco_grpc_e3m0_auth"]
    for name, m in res["methods"].items():
        assert m["error"] is None, (name, m["error"])
    for name in ("p2pdiloco_fp32_auth", "p2pdiloco_fp32_auth-plain"):
        assert res["methods"][name]["max_abs_error"] == res["methods"]["p2pdiloco_fp32"]["max_abs_error"]
        assert res["methods"][name]["bytes_sent_per_peer"] == res["methods"]["p2pdiloco_fp32"]["bytes_sent_per_peer"]
    assert json.loads((tmp_path / "a.json").read_text())["methods"].keys() == res["methods"].keys()
    with pytest.raises(ValueError, match="'p2pdiloco_fp33_auth' is unknown"):
        run_allreduce_bench(2, 100, str(tmp_path / "b.json"), methods=("p2pdiloco_fp33_auth",))

"""A closed run with real peer processes, and a stranger that tries every plane against it.

The stranger knows what anyone on the run's DHT can learn: the run id, a peer's join line, the
peers' records (their addresses, their public certificates) and the run's CA certificate. It uses
the project's own client code without an admission, and an admitted peer's certificate without
that peer's key.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peers import TINY

pytestmark = pytest.mark.timeout(600)


def _decode(value):
    """A closed run's record as a DHT without the run's validator reads it: [mark, value, cert, sig]."""
    from hivemind.utils import MSGPackSerializer
    return MSGPackSerializer.loads(value[1]) if isinstance(value, list) and len(value) == 4 else value


def _raw_dht(maddr: str):
    import hivemind
    dht = hivemind.DHT(initial_peers=[maddr], start=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"], wait_timeout=5)
    dht.run_in_background(await_ready=True, timeout=120)
    return dht


def _in_fresh_process(what: str, *args: str) -> dict:
    """Runs one of this file's raw-DHT clients in a fresh interpreter and returns its JSON answer.

    hivemind.DHT forks its node process; forked from a pytest process whose gRPC threads are busy
    (earlier tests' channels), the child can deadlock before it is ready. A fresh interpreter has none.
    """
    # Its own process group: on a timeout its DHT node and p2pd go with it, not only the interpreter.
    child = subprocess.Popen([sys.executable, __file__, what, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=420)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # whatever the interpreter left behind
        except ProcessLookupError:
            pass
        child.wait()
    assert child.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _observe(maddr: str, run_id: str, wanted: str) -> dict:
    """What an admitted peer's DHT node holds, read by a plain node (which keeps whatever it is handed)."""
    from p2pdiloco.swarm.records import peers_key
    observer = _raw_dht(maddr)
    try:
        deadline = time.monotonic() + 60
        while wanted not in (held := _raw_peers(observer, peers_key(run_id))) and time.monotonic() < deadline:
            time.sleep(0.5)  # a loaded machine: the first reads may time out
        return {"peers": sorted(held), "rounds": _raw_peers(observer, f"p2pdiloco/{run_id}/round/fragment/0/1")}
    finally:
        observer.shutdown()


def _raw_peers(dht, key: str) -> dict:
    found = dht.get(key, latest=True)
    return {} if found is None or not isinstance(found.value, dict) else {k: _decode(v.value) for k, v in found.value.items()}


def _stranger(maddr: str, run_id: str, admitted_cert_der: bytes) -> dict:
    """Everything a stranger tries; returns what each attempt got (the error it raised)."""
    from p2pdiloco.swarm.bulk_caller import BulkPool
    from p2pdiloco.swarm.channels import Channels
    from p2pdiloco.swarm.control import dht_time
    from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb
    from p2pdiloco.swarm.libp2p import LibP2PStub
    from p2pdiloco.swarm.loop import BackgroundLoop
    from p2pdiloco.swarm.records import PROTOCOL_VERSION, PeerRecord, peers_key, split_address
    from p2pdiloco.swarm.state import download_state
    from p2pdiloco.swarm.wire import REQUEST_PAYLOAD, with_payload

    dht = _raw_dht(maddr)
    loop = BackgroundLoop("stranger")
    got = {}
    try:
        me = str(dht.peer_id)
        deadline = time.monotonic() + 60
        while not (records := _raw_peers(dht, peers_key(run_id))) and time.monotonic() < deadline:
            time.sleep(0.5)
        (owner_id, owner), = records.items()
        # A record of its own, and a round declaration, in the run's keys.
        forged = PeerRecord(me, "127.0.0.1:9", [], PROTOCOL_VERSION, owner["config_hash"], owner["config"], "training")
        dht.store(peers_key(run_id), forged.to_dict(), dht_time() + 120, subkey=me)
        dht.store(f"p2pdiloco/{run_id}/round/fragment/0/1", "127.0.0.1:9", dht_time() + 120, subkey=me)
        host, port, bulk = split_address(owner["address"])
        caller = pb.Caller(run_id=run_id, protocol=PROTOCOL_VERSION, config_hash=owner["config_hash"], peer_id=me)
        # Speaking as the owner with its (public) certificate, but without its key.
        stolen = pb.Caller(run_id=run_id, protocol=PROTOCOL_VERSION, config_hash=owner["config_hash"],
                           peer_id=owner_id, cert=admitted_cert_der)
        request = lambda c: pb.ReduceRequest(caller=c, kind="fragment", index=0, round=1, group_id=b"g", weight=1.0)

        async def attempt(name, coro):
            try:
                got[name] = ("answered", await asyncio.wait_for(coro, 60))
            except Exception as exc:
                got[name] = (type(exc).__name__, exc.details() if hasattr(exc, "details") else str(exc))

        async def everything():
            channels = Channels(1 << 24)
            grpc_address = f"{host}:{port}"
            await attempt("grpc_reduce", channels.stub(grpc_address).Reduce(request(caller), timeout=10))
            await attempt("grpc_download", download_state(channels.stub(grpc_address), caller, 10, 1 << 30))
            message = with_payload(request(caller).SerializeToString(), REQUEST_PAYLOAD, [])
            await attempt("bulk_reduce", BulkPool(1 << 24).call(host.strip("[]"), bulk, message, 10))
            p2p = await dht.replicate_p2p()
            stub = LibP2PStub(p2p, f"p2p:{owner_id}")
            # Generous timeouts: a refusal must be told apart from a slow answer on a loaded machine.
            try:
                await attempt("libp2p_reduce", stub.Reduce(request(caller), timeout=40))
                await attempt("libp2p_reduce_stolen_cert", stub.Reduce(request(stolen), timeout=40))
                await attempt("libp2p_download", download_state(stub, stolen, 40, 1 << 30))
            finally:
                await channels.close()
                await p2p.shutdown()

        loop.call(everything(), timeout=300)
    finally:
        loop.stop()
        dht.shutdown()
    return got


def test_a_closed_run_trains_and_refuses_a_stranger_on_every_plane(swarm, text_file, tmp_path):
    from p2pdiloco.swarm.admission import admit, load_admission, make_peer_request, make_run_ca
    make_run_ca(tmp_path / "run")
    for name in ("a", "b"):
        make_peer_request(tmp_path / name)
        admit(tmp_path / "run", tmp_path / name / "peer.csr", tmp_path / name / "peer.pem", days=1)
    a = load_admission(str(tmp_path / "a"))
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--wait-for-peers", "2", "--join-timeout", "400",
            "--json", "s.json"]
    first = swarm.start(*args, "--admission", str(tmp_path / "a"))
    maddr = first.join_address(120)

    # While the first peer waits for a second one, a stranger tries every plane.
    got = _in_fresh_process("stranger", maddr, "p2pdiloco", a.cert_der.hex())
    for name in ("grpc_reduce", "grpc_download", "bulk_reduce", "libp2p_reduce", "libp2p_reduce_stolen_cert",
                 "libp2p_download"):
        assert got[name][0] != "answered", (name, got[name])
    # No TLS handshake without the run's admission: refused before any field is read (in an open run
    # this call reaches the servicer and is refused for its empty payload; the state is given away).
    assert got["grpc_reduce"][0] == "AioRpcError" and "payload" not in got["grpc_reduce"][1]
    assert "download failed" in got["grpc_download"][1]
    assert got["bulk_reduce"][0] == "BulkUnreachable"
    assert "UNAUTHENTICATED" in got["libp2p_reduce"][1] and "no admission certificate" in got["libp2p_reduce"][1]
    assert "PERMISSION_DENIED" in got["libp2p_reduce_stolen_cert"][1]
    assert "PERMISSION_DENIED" in got["libp2p_download"][1]

    # The admitted peer's DHT node kept only admitted peers' own records: read it (the stranger is
    # gone) with a plain DHT node, which keeps whatever it is handed.
    held = _in_fresh_process("observe", maddr, "p2pdiloco", a.peer_id)
    assert held == {"peers": [a.peer_id], "rounds": {}}, held
    first.wait_for("ignored a record that is not an admitted peer's own", 60)
    first.wait_for("refused a libp2p call from", 60)

    # The honest peer was not taken down: an admitted second peer joins, and they train together,
    # the second one reached over libp2p (its certificate checked there) and the first over the bulk port.
    second = swarm.start(*args, "--admission", str(tmp_path / "b"), "--initial-peers", maddr, "--transport", "libp2p")
    status = subprocess.run([sys.executable, "-m", "p2pdiloco.cli", "status", "--initial-peers", maddr, "--admission",
                             str(tmp_path / "a"), "--json"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert a.peer_id in {r["peer_id"] for r in json.loads(status.stdout)}
    for p in (first, second):
        assert p.wait(240) == 0, p.output()[-4000:]
        s = json.loads((p.cwd / "s.json").read_text())
        assert s["completed"] and s["group_sizes"].get("2", 0) > 0, s["group_sizes"]
        assert "closed run: admitted as" in p.output()


def test_an_open_peer_that_tries_to_join_a_closed_run_exits_2_saying_so(swarm, text_file, tmp_path):
    from p2pdiloco.swarm.admission import admit, make_peer_request, make_run_ca
    make_run_ca(tmp_path / "run")
    make_peer_request(tmp_path / "a")
    admit(tmp_path / "run", tmp_path / "a" / "peer.csr", tmp_path / "a" / "peer.pem", days=1)
    args = [*TINY, "--data", str(text_file), "--steps", "400", "--join-timeout", "240"]
    first = swarm.start(*args, "--admission", str(tmp_path / "a"), "--wait-for-peers", "2")
    maddr = first.join_address(120)
    stranger = swarm.start(*args, "--initial-peers", maddr, name="stranger")
    assert stranger.wait(120) == 2, stranger.output()[-3000:]
    assert "is a closed run" in stranger.output() and "--admission" in stranger.output()
    assert first.proc.poll() is None  # still waiting for an admitted second peer, not taken down


def test_an_admitted_newcomer_downloads_the_state_over_tls(swarm, text_file, tmp_path):
    from p2pdiloco.swarm.admission import admit, make_peer_request, make_run_ca
    make_run_ca(tmp_path / "run")
    for name in ("a", "b", "c"):
        make_peer_request(tmp_path / name)
        admit(tmp_path / "run", tmp_path / name / "peer.csr", tmp_path / name / "peer.pem", days=1)
    args = [*TINY, "--data", str(text_file), "--steps", "2000", "--wait-for-peers", "2"]
    first = swarm.start(*args, "--admission", str(tmp_path / "a"))
    maddr = first.join_address(120)
    second = swarm.start(*args, "--admission", str(tmp_path / "b"), "--initial-peers", maddr)
    second.wait_for(r"training from step 0", 120)
    newcomer = swarm.start(*args, "--admission", str(tmp_path / "c"), "--initial-peers", maddr)
    m = newcomer.wait_for(r"downloaded the run's state \(([\d,]+) bytes, verified: 2 donors agree\).*joining at step (\d+)", 120)
    assert int(m.group(2)) > 0
    for p in (first, second, newcomer):
        p.signal(signal.SIGTERM)
    for p in (first, second, newcomer):
        assert p.wait(120) == 0, p.output()[-3000:]


if __name__ == "__main__":
    what, maddr, run_id, extra = sys.argv[1:5]
    answer = _stranger(maddr, run_id, bytes.fromhex(extra)) if what == "stranger" else _observe(maddr, run_id, extra)
    print(json.dumps(answer, default=str))

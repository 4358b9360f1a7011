"""Bad input to the swarm, with real peers: each is a clear error or a refusal, and the swarm goes on."""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys

import grpc
import pytest

from p2pdiloco.codecs import get_codec
from p2pdiloco.swarm.bulk import MAGIC
from p2pdiloco.swarm.gen import p2pdiloco_pb2 as pb
from p2pdiloco.swarm.gen import p2pdiloco_pb2_grpc as pb_grpc
from p2pdiloco.swarm.records import PROTOCOL_VERSION
from peers import TINY

pytestmark = pytest.mark.timeout(240)


def peer_cmd(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "p2pdiloco.cli", "peer", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_an_unreachable_initial_peer_is_a_clear_error(text_file):
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWKue2gpZyjd3hA6tTUKRjWWbyc2hsBFm97Zf6rHcAbbYD"
    out = peer_cmd(*TINY, "--data", str(text_file), "--initial-peers", dead)
    assert out.returncode == 2, out.stderr
    assert "could not start the DHT" in out.stderr and "p2pdiloco status" in out.stderr


def test_a_port_in_use_is_a_clear_error(text_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = peer_cmd(*TINY, "--data", str(text_file), "--port", str(port))
    assert out.returncode == 2, out.stderr + out.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_a_fragment_too_large_for_one_message_is_refused_at_the_start(text_file):
    """One fragment of the whole tiny model in fp32: half of it (a span in a group of 2) is 1.6 MiB,
    over --max-message-mb 1. Said at the start, not as a refused round at every sync."""
    out = peer_cmd(*TINY, "--data", str(text_file), "--fragments", "1", "--codec", "fp32", "--max-message-mb", "1")
    assert out.returncode == 2, out.stderr + out.stdout
    assert "fragment 0 has" in out.stderr and "over --max-message-mb 1" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_peer_of_another_config_is_refused_and_the_run_goes_on(swarm, text_file):
    first = swarm.start(*TINY, "--data", str(text_file), "--steps", "100000")
    addr = first.join_address()
    first.wait_for("training from step 0", 120)
    other = swarm.start(*TINY, "--data", str(text_file), "--steps", "100000", "--fragments", "1",
                        "--initial-peers", addr)
    assert other.wait(90) == 2
    assert "trains model=tiny" in other.output() and "fragments=2" in other.output()
    assert first.proc.poll() is None


def test_malformed_oversized_and_foreign_messages_are_refused(swarm, text_file):
    peer = swarm.start(*TINY, "--data", str(text_file), "--steps", "100000", "--max-message-mb", "1",
                       "--codec", "e3m0")
    address, bulk_port = peer.wait_for(r"serving on (\S+)\+(\d+)", 90).groups()
    peer.wait_for("training from step 0", 120)
    from p2pdiloco.config import build
    from p2pdiloco.simulate import SimConfig
    from p2pdiloco.swarm.records import config_hash
    # The hash the peer computed for its own config (TINY's options, the test corpus, 100000 steps).
    cfg = build(SimConfig, {"model": "tiny", "steps": 100000, "batch_size": 4, "eval_batches": 2,
                            "data": {"paths": (str(text_file),), "seq_len": 32},
                            "inner": {"lr": 3e-3, "warmup_steps": 2},
                            "streaming": {"H": 6, "fragments": 2, "tau": 1, "codec": "e3m0"}})
    good = pb.Caller(run_id="p2pdiloco", protocol=PROTOCOL_VERSION, config_hash=config_hash(cfg), peer_id="intruder")
    part = get_codec("e3m0").encode(__import__("torch").randn(4096)).to_bytes()

    def reduce(caller=good, payload=part, weight=10.0):
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.AveragingStub(channel)
            return stub.Reduce(pb.ReduceRequest(caller=caller, kind="fragment", index=0, round=10**6,
                                                group_id=b"x", weight=weight, payload=payload), timeout=10)

    cases = [
        (dict(payload=b"\x07garbage"), grpc.StatusCode.INVALID_ARGUMENT, "malformed payload"),
        (dict(payload=get_codec("fp32").encode(__import__("torch").randn(8)).to_bytes()),
         grpc.StatusCode.INVALID_ARGUMENT, "codec"),
        (dict(weight=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "weight"),
        (dict(payload=b"\x00" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        (dict(caller=pb.Caller(run_id="p2pdiloco", protocol=PROTOCOL_VERSION, config_hash="0" * 16, peer_id="x")),
         grpc.StatusCode.FAILED_PRECONDITION, "config hash"),
        (dict(caller=pb.Caller(run_id="p2pdiloco", protocol=99, config_hash=good.config_hash, peer_id="x")),
         grpc.StatusCode.FAILED_PRECONDITION, "protocol"),
    ]
    for kwargs, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            reduce(**kwargs)
        assert err.value.code() == code, (kwargs.keys(), err.value)
        assert re.search(text, err.value.details() or ""), err.value.details()
    # The bulk port refuses the same way (tests/test_bulk.py has the rest).
    foreign = pb.Caller(run_id="p2pdiloco", protocol=PROTOCOL_VERSION, config_hash="0" * 16, peer_id="x")
    wire = pb.ReduceRequest(caller=foreign, kind="fragment", index=0, round=10**6, group_id=b"x",
                            weight=1.0, payload=part).SerializeToString()
    with socket.create_connection((address.rsplit(":", 1)[0], int(bulk_port)), timeout=10) as s:
        s.sendall(MAGIC + struct.pack("<Q", len(wire)) + wire)
        reply = b""
        while len(reply) < len(MAGIC) + 9 + 20:
            reply += s.recv(1 << 16) or b"!"  # a closed connection ends the wait (and fails below)
    assert reply.startswith(MAGIC)
    reply = reply[len(MAGIC):]
    assert reply[0] == grpc.StatusCode.FAILED_PRECONDITION.value[0] and b"config hash" in reply, reply
    # A part for a round the peer never opens waits until the caller's deadline, and no longer.
    with pytest.raises(grpc.RpcError) as err:
        reduce()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert peer.proc.poll() is None, peer.output()
    steps_before = int(peer.wait_for(r"step (\d+)/100000", 30).group(1))
    peer.wait_for(rf"step (?!{steps_before}/)\d+/100000", 30)  # still training

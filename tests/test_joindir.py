"""`--join-dir`: peers that find each other through a shared folder (how docker/compose.yml joins)."""
from __future__ import annotations

import pytest

from p2pdiloco.swarm import joindir
from peers import TINY
from test_swarm import finish_with_same_models

ID_A = "12D3KooWR26ZxiAMYdKyNaVTHr4WnkwdgSHDVkbvmBDrzYE8GTp7"
ID_B = "12D3KooWQ2hFnKjpL3HRVVtJBpC4Rrwq1fGHXVMDyoZbzT7ZdHas"


def test_read_takes_multiaddrs_skips_junk_and_self(tmp_path):
    assert joindir.read(str(tmp_path / "missing")) == ()
    joindir.publish(str(tmp_path), ID_A, [f"/ip4/10.0.0.2/tcp/4000/p2p/{ID_A}", f"/ip4/127.0.0.1/tcp/4000/p2p/{ID_A}"])
    joindir.publish(str(tmp_path), ID_B, [f"/ip4/10.0.0.3/tcp/4001/p2p/{ID_B}"])
    (tmp_path / "junk.maddr").write_text("not-an-address\n/ip4/1.2.3.4/tcp/1\n")
    (tmp_path / "notes.txt").write_text(f"/ip4/9.9.9.9/tcp/1/p2p/{ID_B}\n")
    (tmp_path / "binary.maddr").write_bytes(b"\xff\xfe\x00")
    found = joindir.read(str(tmp_path), exclude=ID_B)
    assert found == (f"/ip4/10.0.0.2/tcp/4000/p2p/{ID_A}", f"/ip4/127.0.0.1/tcp/4000/p2p/{ID_A}")
    assert len(joindir.read(str(tmp_path))) == 3
    joindir.withdraw(str(tmp_path), ID_A)
    joindir.withdraw(str(tmp_path), ID_A)  # twice is fine
    assert joindir.read(str(tmp_path)) == (f"/ip4/10.0.0.3/tcp/4001/p2p/{ID_B}",)


def test_wildcard_host_needs_an_announce_address():
    from p2pdiloco.swarm.config import SwarmConfig
    with pytest.raises(ValueError, match="announce_host"):
        SwarmConfig(host="0.0.0.0").validate(1)
    SwarmConfig(host="0.0.0.0", announce_host="10.0.0.2").validate(1)


@pytest.mark.timeout(240)
def test_peers_join_through_a_shared_folder_and_leave_it_clean(swarm, tmp_path):
    """The compose setup on loopback: listen on every interface, announce one address, and join
    with no peer id copied by hand; a clean exit removes the peer's file."""
    folder = tmp_path / "join"
    args = [*TINY, "--steps", "14", "--wait-for-peers", "2", "--join-dir", str(folder),
            "--host", "0.0.0.0", "--announce-host", "127.0.0.1", "--json", "s.json"]
    first = swarm.start(*args)
    first.wait_for("no peers listed; starting a new swarm", 60)
    line = first.join_address()
    assert line.startswith("/ip4/127.0.0.1/")
    first.wait_for("^\\[peer\\] join with", 30)
    second = swarm.start(*args)
    second.wait_for(r"joining through 1 address", 60)
    finish_with_same_models([first, second])
    assert list(folder.glob("*.maddr")) == []

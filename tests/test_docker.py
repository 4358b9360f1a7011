"""docker/: the image's command lines and the compose file, checked without a Docker engine.

The compose file is validated by the docker-compose client (skipped when it is missing, except in
CI, where scripts/test installs it). The commands the image runs are produced by running
docker/entrypoint.sh with a stub `p2pdiloco` that records its argv, then parsed by the real parser
and turned into configs. One test runs the entrypoint with the real peer: healthcheck, join file,
and SIGTERM (what `docker stop` sends) ending in exit 0 with a checkpoint.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from p2pdiloco.cli import build_parser
from p2pdiloco.swarm.cli import peer_configs

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SERVICES = {"seed", "peer", "peer-gpu"}
VOLUMES = {"swarm", "checkpoints", "data"}
# /data holding files becomes --data /data inside the image; on a machine that has one, expect it too.
HOST_DATA = os.path.isdir("/data") and bool(os.listdir("/data"))


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def substitute(value: str, env: dict) -> str:
    """Compose's ${VAR} and ${VAR:-default} (all that compose.yml uses)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), str(value))


def service_env(name: str, env: dict | None = None) -> dict:
    raw = compose_file()["services"][name]["environment"]
    return {k: substitute(v, env or {}) for k, v in raw.items()}


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PDILOCO_")}
    env.update(extra)
    return env


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("docker-compose is missing in CI; scripts/test installs it (apt-get install docker-compose)")
        pytest.skip("the docker-compose client is not installed (apt-get install docker-compose): "
                    "docker/compose.yml was not validated")
    return exe


def compose_config(tmp_path, *args, **env) -> dict:
    empty = tmp_path / "empty.env"  # keep a local docker/.env out of the test
    empty.write_text("")
    r = subprocess.run([docker_compose(), "--env-file", str(empty), "-f", str(COMPOSE), *args, "config"],
                       capture_output=True, text=True, env=clean_env(**env), timeout=60)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


# ---- the compose file

def test_compose_names_services_volumes_and_wiring():
    c = compose_file()
    assert set(c["services"]) == SERVICES and set(c["volumes"]) == VOLUMES
    for name, s in c["services"].items():
        assert "swarm:/swarm" in s["volumes"], name
        assert s["healthcheck"]["test"] == ["CMD", "p2pdiloco-entrypoint", "healthcheck"]
        assert s["init"] is True and s["stop_grace_period"]
        assert s["build"]["dockerfile"] == "docker/Dockerfile" and (DOCKER / s["build"]["context"]).resolve() == ROOT
        env = service_env(name)
        assert env["P2PDILOCO_JOIN_DIR"] == "/swarm/join" and env["P2PDILOCO_CHECKPOINT_DIR"] == "/checkpoints"
        assert env["P2PDILOCO_PROFILE"]  # each service picks its hardware
    for name in ("peer", "peer-gpu"):
        assert c["services"][name]["depends_on"] == {"seed": {"condition": "service_healthy"}}
    gpu = c["services"]["peer-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["DEVICE"] == "cuda" and gpu["image"].endswith(":cuda")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert service_env("peer-gpu")["P2PDILOCO_DEVICE"] == "cuda"
    assert service_env("peer", {"P2PDILOCO_PEER_PROFILE": "apple-laptop"})["P2PDILOCO_PROFILE"] == "apple-laptop"


def test_compose_validates_with_docker_compose(tmp_path):
    c = compose_config(tmp_path)
    assert set(c["services"]) == SERVICES and set(c["volumes"]) == VOLUMES
    assert c["services"]["peer"]["depends_on"] == {"seed": {"condition": "service_healthy"}}
    for name in SERVICES:  # the client resolves the variables as our substitute() does
        assert c["services"][name]["environment"] == service_env(name), name
    assert "data:/data:ro" in c["services"]["seed"]["volumes"]

    env = {"P2PDILOCO_DATA_DIR": "/srv/corpus", "P2PDILOCO_CHECKPOINTS": "/srv/ckpt", "P2PDILOCO_RUN_ID": "r7",
           "P2PDILOCO_ARGS": "--model tiny --steps 50", "P2PDILOCO_SEED_PROFILE": "datacenter-gpu"}
    c = compose_config(tmp_path, "--profile", "gpu", **env)
    seed = c["services"]["seed"]
    assert {"/srv/corpus:/data:ro", "/srv/ckpt:/checkpoints:rw"} <= set(seed["volumes"])
    assert seed["environment"] == service_env("seed", env)
    assert seed["environment"]["P2PDILOCO_RUN_ID"] == "r7" and seed["environment"]["P2PDILOCO_PROFILE"] == "datacenter-gpu"


# ---- the image

def dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_dockerfile_builds_cpu_by_default_and_execs_the_peer():
    steps = dockerfile()
    one = lambda op: [arg for o, arg in steps if o == op]  # noqa: E731
    assert json.loads(one("ENTRYPOINT")[-1]) == ["p2pdiloco-entrypoint"]
    assert json.loads(one("CMD")[-1]) == ["peer"]
    runs = " ".join(one("RUN"))
    assert "install -m 0755 /opt/p2pdiloco/docker/entrypoint.sh /usr/local/bin/p2pdiloco-entrypoint" in runs
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in one("ARG"))
    env_sh = (ROOT / "scripts" / "env.sh").read_text()
    assert args["DEVICE"] == "cpu" and f"P2PDILOCO_TORCH:-{args['TORCH_SPEC']}" in env_sh  # the pin CI uses
    assert "TORCH_INDEX" in args and "download.pytorch.org/whl/cpu" in runs
    assert one("USER")[-1] not in ("root", "0")
    # The peer replaces the entrypoint's shell, so SIGTERM from `docker stop` reaches it.
    last = [ln for ln in ENTRYPOINT.read_text().splitlines() if ln.strip() and not ln.startswith("#")][-1]
    assert last == 'exec p2pdiloco "${args[@]}" "$@"'


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for must in (".git", ".venv", "runs", "checkpoints", "results"):
        assert must in patterns
    ignored = lambda path: any(fnmatch(path, p) or fnmatch(path.split("/")[0], p) for p in patterns)  # noqa: E731
    for needed in ("pyproject.toml", "README.md", "p2pdiloco/cli.py", "docker/entrypoint.sh", "peers/cpu-small.toml"):
        assert not ignored(needed), needed


# ---- the entrypoint, with a stub peer

def run_entrypoint(tmp_path, args, env=None, real=False, **kw):
    """Run docker/entrypoint.sh; a stub `p2pdiloco` (or a shim to the real one) comes first on PATH."""
    bin_dir = tmp_path / ("bin-real" if real else "bin-stub")
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "p2pdiloco"
    if real:
        stub.write_text(f'#!/bin/sh\nexec {sys.executable} -m p2pdiloco.cli "$@"\n')
    else:
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"json.dump({{'pid': os.getpid(), 'argv': sys.argv[1:]}}, open(os.environ['STUB_OUT'], 'w'))\n")
    stub.chmod(0o755)
    full = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path), STUB_OUT=str(tmp_path / "argv.json"))
    full.update(env or {})
    return subprocess.Popen(["bash", str(ENTRYPOINT), *args], env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def exec_argv(tmp_path, args, env=None) -> list[str]:
    p = run_entrypoint(tmp_path, args, env)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    out = json.loads((tmp_path / "argv.json").read_text())
    assert out["pid"] == p.pid  # exec'd all the way down: the peer is the process docker signals
    return out["argv"]


def configs(argv):
    args = build_parser().parse_args(argv)
    assert args.command == "peer"
    return peer_configs(args)


def this_host_ip() -> str:
    return socket.gethostbyname(socket.gethostname())


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_services_run_a_peer_command_the_cli_accepts(tmp_path, name):
    service = compose_file()["services"][name]
    argv = exec_argv(tmp_path, service["command"], service_env(name))
    sim, swarm, hw = configs(argv)
    assert swarm.join_dir == "/swarm/join" and not swarm.initial_peers
    assert (swarm.host, swarm.announce_host, swarm.port, swarm.dht_port, swarm.bulk_port) == (
        "0.0.0.0", this_host_ip(), 7000, 7001, 7002)
    assert swarm.run_id == "p2pdiloco" and swarm.checkpoint_dir == "/checkpoints"
    assert ("--data" in argv) == HOST_DATA
    if name == "peer-gpu":
        assert hw.device == "cuda"


def test_image_default_command_and_overrides(tmp_path, text_file):
    cmd = json.loads(dict(dockerfile())["CMD"])
    sim, swarm, hw = configs(exec_argv(tmp_path, cmd))  # `docker run p2pdiloco:cpu`, no environment
    assert swarm.join_dir == "/swarm/join" and swarm.announce_host == this_host_ip()

    env = {"P2PDILOCO_RUN_ID": "r1", "P2PDILOCO_PORT": "7100", "P2PDILOCO_DHT_PORT": "7101",
           "P2PDILOCO_ANNOUNCE_HOST": "peer.example.org", "P2PDILOCO_DEVICE": "cpu", "P2PDILOCO_JOIN_DIR": "",
           "P2PDILOCO_INITIAL_PEERS": "/ip4/10.0.0.2/tcp/7001/p2p/12D3KooWA /dns4/seed/tcp/7001/p2p/12D3KooWB",
           "P2PDILOCO_DATA": f"{text_file} {text_file.parent}", "P2PDILOCO_ARGS": "--model micro --steps 100 --H 20"}
    # Options given to the container come last and win over the environment's.
    sim, swarm, hw = configs(exec_argv(tmp_path, ["--steps", "7", "--threads", "2"], env))
    assert (swarm.run_id, swarm.port, swarm.dht_port, swarm.announce_host) == ("r1", 7100, 7101, "peer.example.org")
    assert swarm.join_dir == "" and swarm.initial_peers == tuple(env["P2PDILOCO_INITIAL_PEERS"].split())
    assert sim.data.paths == (str(text_file), str(text_file.parent))
    assert (sim.model, sim.steps, sim.streaming.H, hw.device, hw.threads) == ("micro", 7, 20, "cpu", 2)


def test_status_joins_through_the_join_dir_newest_first(tmp_path):
    join = tmp_path / "join"
    join.mkdir()
    env = {"P2PDILOCO_JOIN_DIR": str(join), "P2PDILOCO_RUN_ID": "r2"}
    p = run_entrypoint(tmp_path, ["status"], env)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "no live peers listed" in err
    old, new = "/ip4/10.0.0.2/tcp/7001/p2p/12D3KooWold", "/ip4/10.0.0.3/tcp/7001/p2p/12D3KooWnew"
    (join / "old.maddr").write_text(f"{old}\n/ip4/127.0.0.1/tcp/7001/p2p/12D3KooWold\n")
    (join / "new.maddr").write_text(f"{new}\n")
    os.utime(join / "old.maddr", (time.time() - 60,) * 2)
    argv = exec_argv(tmp_path, ["status", "--json"], env)
    args = build_parser().parse_args(argv)
    assert (args.command, args.run_id, args.initial_peers, args.json) == ("status", "r2", [new, old], True)
    argv = exec_argv(tmp_path, ["status", "--initial-peers", old], env)
    assert build_parser().parse_args(argv).initial_peers == [old]


def test_other_commands_run_as_given(tmp_path):
    p = run_entrypoint(tmp_path, [sys.executable, "-c", "print('as given')"])
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == "as given\n", err


def test_healthcheck_needs_a_fresh_join_file_of_this_container(tmp_path):
    join = tmp_path / "join"
    join.mkdir()
    env = {"P2PDILOCO_JOIN_DIR": str(join), "P2PDILOCO_ANNOUNCE_HOST": "10.1.2.3"}

    def healthy() -> bool:
        p = run_entrypoint(tmp_path, ["healthcheck"], env)
        p.communicate(timeout=30)
        return p.returncode == 0

    stale = join / "stale.maddr"
    stale.write_text("/ip4/10.1.2.3/tcp/7001/p2p/12D3KooWstale\n")  # a crashed container's, same address
    os.utime(stale, (time.time() - 60,) * 2)
    assert not healthy()  # this container has not started a peer
    exec_argv(tmp_path, ["peer"], env)  # the stub "peer" starts: the container's start is marked
    assert not healthy()
    (join / "other.maddr").write_text("/ip4/10.9.9.9/tcp/7001/p2p/12D3KooWother\n")
    assert not healthy()
    (join / "mine.maddr").write_text("/ip4/10.1.2.3/tcp/7001/p2p/12D3KooWmine\n/ip4/127.0.0.1/tcp/7001/p2p/12D3KooWmine\n")
    assert healthy()


# ---- the entrypoint, with the real peer

def test_real_peer_becomes_healthy_and_stops_cleanly_on_sigterm(tmp_path, text_file):
    join, ckpt = tmp_path / "join", tmp_path / "ckpt"
    env = {"P2PDILOCO_JOIN_DIR": str(join), "P2PDILOCO_CHECKPOINT_DIR": str(ckpt), "P2PDILOCO_RUN_ID": "dock",
           "P2PDILOCO_HOST": "127.0.0.1", "P2PDILOCO_ANNOUNCE_HOST": "127.0.0.1", "P2PDILOCO_PORT": "0",
           "P2PDILOCO_DHT_PORT": "0", "P2PDILOCO_DATA": str(text_file),
           "P2PDILOCO_ARGS": "--model micro --seq-len 32 --batch-size 2 --steps 1000000 --threads 1"}
    peer = run_entrypoint(tmp_path, ["peer"], env, real=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            check = run_entrypoint(tmp_path, ["healthcheck"], env)
            check.communicate(timeout=30)
            if check.returncode == 0:
                break
            assert peer.poll() is None, peer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the peer never wrote its join file"
            time.sleep(0.3)
        files = list(join.glob("*.maddr"))
        assert len(files) == 1 and files[0].read_text().startswith("/ip4/127.0.0.1/tcp/")
        time.sleep(1)  # train a few steps, so there is something to checkpoint
        peer.send_signal(signal.SIGTERM)  # what `docker stop` does to the container's main process
        out, err = peer.communicate(timeout=90)
        assert peer.returncode == 0, err[-3000:]
        assert "SIGTERM: finishing this step" in out
        assert not list(join.glob("*.maddr"))  # it left cleanly: nobody will try its address
        assert list((ckpt / "dock").glob(f"{files[0].stem}.pt"))
    finally:
        if peer.poll() is None:
            os.killpg(peer.pid, signal.SIGKILL)
            peer.communicate()

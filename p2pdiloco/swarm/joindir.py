"""`--join-dir`: joining a swarm without copying a peer id by hand.

Every peer given a join directory (a folder shared by all of them, such as a docker volume) writes
its DHT multiaddrs there as `<peer id>.maddr` once it is live, and removes the file when it leaves
cleanly. A peer started with a join directory and no `--initial-peers` joins through the addresses
found there, and starts a new swarm only when there are none. Files of peers that crashed stay
behind; the DHT tolerates them as long as one listed peer is alive.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("p2pdiloco.joindir")

SUFFIX = ".maddr"


def read(directory: str, exclude: str = "") -> tuple[str, ...]:
    """Every well-formed multiaddr in the directory's files, newest file first."""
    path = Path(directory)
    if not path.is_dir():
        return ()
    files = sorted(path.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    out: list[str] = []
    for f in files:
        if f.stem == exclude:
            continue
        try:
            lines = f.read_text().split()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("ignoring unreadable join file %s: %s", f, exc)
            continue
        for line in lines:
            if line.startswith("/") and "/p2p/" in line and line not in out:
                out.append(line)
            else:
                log.warning("ignoring %r in join file %s: not a multiaddr with a peer id", line[:80], f)
    return tuple(out)


def publish(directory: str, peer_id: str, maddrs: list[str]) -> Path:
    """Write this peer's addresses atomically: a reader never sees half a file."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{peer_id}{SUFFIX}"
    tmp = path / f".{peer_id}.tmp"
    tmp.write_text("\n".join(maddrs) + "\n")
    os.replace(tmp, target)
    return target


def withdraw(directory: str, peer_id: str) -> None:
    try:
        (Path(directory) / f"{peer_id}{SUFFIX}").unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove this peer's join file: %s", exc)

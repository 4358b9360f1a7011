"""The test bed's switch for kernels built without sch_netem (the dev VM's has tbf but no netem):
a userspace Ethernet switch that holds every frame for the path's delay and drops it with the
path's loss probability. Rate stays in the kernel (tbf on both ends of every veth, netns.py).

It reads the frames each peer sends from the root-namespace end of the peer's veth (an AF_PACKET
socket), and after the delay writes them to the veth of the peer whose MAC they are for (all
others for broadcast and multicast). Frames keep their virtio-net header (PACKET_VNET_HDR), so
checksum offload and GSO survive the trip: a frame written back is the frame that was read.

A frame from port i to port j waits delay_s[i] + delay_s[j] and survives with probability
(1 - loss[i]) (1 - loss[j]): each port is half of every path it is on, as with netem on both ends.
A write that the downlink's tbf refuses (its queue is full) is a tail drop, as on a real link.

Started by NetnsBed: `python -m p2pdiloco.wan.wire '{"ports": [{"dev", "mac", "delay_s", "loss"}, ...]}'`.
It prints `ready` once every socket is bound, and exits on SIGTERM or when its parent is gone.
"""
from __future__ import annotations

import errno
import heapq
import json
import os
import random
import select
import signal
import socket
import sys
import time

SOL_PACKET, PACKET_VNET_HDR, ETH_P_ALL = 263, 15, 0x0003
SO_SNDBUFFORCE, SO_RCVBUFFORCE, SOCKET_BUFFER = 32, 33, 16 << 20
VNET_HDR = 10  # struct virtio_net_hdr, before every frame read or written
MAX_FRAME = 65536 + VNET_HDR + 14  # a GSO frame can reach 64 KiB


def run(ports: list[dict], stats: dict, seed: int = 0) -> None:
    rng = random.Random(seed)
    socks = []
    for p in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        # Frames waiting in a downlink's tbf count against the socket's send buffer: make it larger
        # than any queue (the default 208 KiB is less than 100 ms at 20 Mbit/s), so the tbf decides
        # what is dropped; a large receive buffer rides out the moments this process is not scheduled.
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        s.bind((p["dev"], 0))
        s.setblocking(False)
        socks.append(s)
    by_mac = {bytes.fromhex(p["mac"].replace(":", "")): j for j, p in enumerate(ports)}
    delay = [float(p["delay_s"]) for p in ports]
    keep = [1 - float(p["loss"]) for p in ports]
    poller = select.epoll()
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    stats.update(frames=0, lost=0, queue_drops=0)
    held: list[tuple[float, int, int, bytes]] = []  # (release time, sequence, to port, frame)
    seq, parent = 0, os.getppid()
    print("ready", flush=True)
    while os.getppid() == parent:  # a harness that died without teardown must not leave us running
        timeout = min(1.0, max(0.0, held[0][0] - time.monotonic())) if held else 1.0
        for fd, _ in poller.poll(timeout):
            i = by_fd[fd]
            while True:
                try:
                    frame, addr = socks[i].recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if addr[2] == socket.PACKET_OUTGOING:  # our own writes to this port
                    continue
                now, dst = time.monotonic(), frame[VNET_HDR:VNET_HDR + 6]
                targets = [by_mac[dst]] if dst in by_mac else [] if not dst[0] & 1 else \
                    [j for j in range(len(ports)) if j != i]
                for j in targets:
                    stats["frames"] += 1
                    if rng.random() >= keep[i] * keep[j]:
                        stats["lost"] += 1
                        continue
                    seq += 1
                    heapq.heappush(held, (now + delay[i] + delay[j], seq, j, frame))
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, j, frame = heapq.heappop(held)
            try:
                socks[j].send(frame)
            except OSError as exc:  # ENOBUFS: the downlink's queue is full; anything else is counted
                key = "queue_drops" if exc.errno == errno.ENOBUFS else f"error {errno.errorcode.get(exc.errno, exc.errno)}"
                stats[key] = stats.get(key, 0) + 1


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    stats: dict = {}
    try:
        run(spec["ports"], stats, spec.get("seed", 0))
    except (SystemExit, KeyboardInterrupt):
        pass
    print(f"wire: {time.process_time():.1f} CPU s, {stats}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

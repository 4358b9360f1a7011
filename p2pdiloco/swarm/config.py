"""The swarm's typed config: the `[swarm]` table of a config file and the peer command's options.

Every network wait is one of these fields, so every timeout is explicit and documented here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class SwarmConfig:
    run_id: str = "p2pdiloco"  # peers of one run find each other under this name
    initial_peers: tuple[str, ...] = ()  # multiaddrs of any live peers; none: start a new swarm
    host: str = "127.0.0.1"  # address to listen on, for the DHT and the data plane
    announce_host: str = ""  # address other peers reach this one at (default: host)
    port: int = 0  # gRPC data plane port (0: any free port)
    bulk_port: int = 0  # the data plane's bulk port for Reduce (bulk.py; 0: any free port, -1: none, Reduce over gRPC)
    dht_port: int = 0  # libp2p port of the DHT (0: any free port)
    identity_path: str = ""  # a libp2p key file: a stable peer id, and so a stable join line
    join_dir: str = ""  # a shared folder of live peers' addresses (joindir.py): join without copying a peer id
    # A closed run (admission.py, docs/swarm.md "Closed runs"): this peer's admission folder (run-ca.pem,
    # peer.pem, peer.key, and identity.key unless identity_path is given); "": an open run.
    admission_dir: str = ""
    revoked_path: str = ""  # a closed run: a file of revoked peer ids, one per line, read again when it changes
    # A closed run's bulk port after each connection's TLS handshake (bulk_seal.py): messages sealed
    # with AES-GCM, or "none": plain, when both ends choose it (a network that is private already).
    bulk_encryption: str = "aes-gcm"
    # How others reach this peer's data plane: grpc (host:port; auto means grpc), or libp2p (streams
    # over the DHT's daemon, for a peer that cannot accept connections). Every peer serves both.
    transport: str = "auto"
    group_size: int = 16  # peers per averaging group; larger swarms regroup at random every round
    matchmaking_s: float = 5.0  # the longest a peer waits for the other live peers to declare a round
    # Start a round's matchmaking this many steps before it is due (network.py `ahead`), so its DHT
    # round trips overlap training: -1 sized from this peer's measured matchmaking and step time, 0 never.
    declare_ahead: int = -1
    reduce_timeout_s: float = 15.0  # the longest an owner waits for parts, and a member for an answer
    heartbeat_s: float = 1.0  # how often a peer refreshes its DHT record
    record_ttl_s: float = 5.0  # a record not refreshed for this long expires: the peer is gone
    join_timeout_s: float = 60.0  # one attempt to download the state from one donor
    wait_for_peers: int = 1  # start training once this many peers (this one included) are present
    max_message_mb: int = 256  # largest data-plane message accepted, in MiB
    shard: int = -1  # data shard index in [0, workers); -1: a peer-specific random order over all data
    checkpoint_dir: str = "checkpoints"
    # Write a checkpoint every this many inner steps (checkpoint.py; 0: only when leaving). Steps, not
    # seconds: the peers of a run then checkpoint at the same steps, so a stopped run resumes together.
    checkpoint_every: int = 0
    resume: str = ""  # a checkpoint file, or "auto": the newest of this run under checkpoint_dir ("" : none)
    summary_json: str = ""  # where to write the peer's summary at the end ("" : none)
    adversary: str = ""  # bench attack only: lie to the other peers this way (adversary.py); "": honest
    # Metrics (metrics.py): a Prometheus endpoint on host:metrics_port (0: any free port; -1: none), and a
    # JSONL file with the same figures, a line every metrics_interval_s seconds ("": none).
    metrics_port: int = -1
    metrics_jsonl: str = ""
    metrics_interval_s: float = 5.0
    eval_every_s: float = 0.0  # evaluate the global model this often (wall-clock seconds) for the summary's curve; 0: start and end only

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def max_state_bytes(self) -> int:
        return 64 << 30

    def validate(self, workers: int) -> "SwarmConfig":
        if not RUN_ID.match(self.run_id):
            raise ValueError(f"swarm.run_id '{self.run_id}' must be 1-64 letters, digits, '.', '_' or '-'")
        for m in self.initial_peers:
            if not m.startswith("/") or "/p2p/" not in m:
                raise ValueError(f"swarm.initial_peers: '{m}' is not a libp2p multiaddress with a peer id "
                                 f"(like /ip4/1.2.3.4/tcp/4000/p2p/12D3Koo...); copy it from a peer's join line")
        if self.host in ("0.0.0.0", "::") and not self.announce_host:
            raise ValueError(f"swarm.announce_host is needed when swarm.host is {self.host}: other peers cannot "
                             f"connect to a wildcard address; pass --announce-host with this machine's reachable address")
        if self.revoked_path and not self.admission_dir:
            raise ValueError("swarm.revoked_path is for closed runs: give swarm.admission_dir (--admission) too")
        if self.bulk_encryption not in ("aes-gcm", "none"):
            raise ValueError(f"swarm.bulk_encryption '{self.bulk_encryption}' is unknown; use aes-gcm or none")
        if self.transport not in ("grpc", "auto", "libp2p"):
            raise ValueError(f"swarm.transport '{self.transport}' is unknown; use auto, grpc or libp2p")
        for name in ("port", "dht_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"swarm.{name} must be a TCP port in [0, 65535], got {getattr(self, name)}")
        if not -1 <= self.bulk_port <= 65535:
            raise ValueError(f"swarm.bulk_port must be a TCP port in [0, 65535], or -1 for none, got {self.bulk_port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"swarm.metrics_port must be a TCP port in [0, 65535], or -1 for none, got {self.metrics_port}")
        if not self.metrics_interval_s > 0:
            raise ValueError(f"swarm.metrics_interval_s must be positive (seconds between JSONL lines), "
                             f"got {self.metrics_interval_s}")
        for name in ("matchmaking_s", "reduce_timeout_s", "heartbeat_s", "record_ttl_s", "join_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"swarm.{name} must be positive, got {getattr(self, name)}")
        if self.record_ttl_s < 2 * self.heartbeat_s:
            raise ValueError(f"swarm.record_ttl_s ({self.record_ttl_s}) must be at least twice heartbeat_s "
                             f"({self.heartbeat_s}), or live peers flicker out of the swarm")
        if self.eval_every_s < 0:
            raise ValueError(f"swarm.eval_every_s must be ≥ 0 (0: evaluate at the start and end only), got {self.eval_every_s}")
        if self.checkpoint_every < 0:
            raise ValueError(f"swarm.checkpoint_every must be ≥ 0 steps (0: only when leaving), got {self.checkpoint_every}")
        if self.resume and self.resume != "auto" and not Path(self.resume).is_file():
            raise ValueError(f"swarm.resume: '{self.resume}' is not a file; give a checkpoint "
                             f"(<checkpoint-dir>/<run id>/<peer id>.pt) or 'auto'")
        if self.declare_ahead < -1:
            raise ValueError(f"swarm.declare_ahead must be -1 (auto), 0 (off) or a number of steps, got {self.declare_ahead}")
        if self.group_size < 2 or self.wait_for_peers < 1 or self.max_message_mb < 1:
            raise ValueError("swarm.group_size must be ≥ 2, swarm.wait_for_peers ≥ 1 and swarm.max_message_mb ≥ 1")
        if self.adversary:
            from .adversary import KINDS
            if self.adversary not in KINDS:
                raise ValueError(f"swarm.adversary '{self.adversary}' is unknown; use one of {', '.join(KINDS)}")
        if not -1 <= self.shard < workers:
            raise ValueError(f"swarm.shard ({self.shard}) must be -1 (automatic) or in [0, workers={workers})")
        return self

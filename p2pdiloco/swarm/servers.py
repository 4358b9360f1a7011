"""A peer's data-plane servers: the gRPC server (every call of proto/p2pdiloco.proto) and, unless
turned off, the bulk port that carries Reduce outside gRPC (bulk.py). The address a peer announces
names both: `host:port+bulk port`, or `host:port` without a bulk port."""
from __future__ import annotations

import grpc

from .bulk import BulkServer
from .control import SwarmStartError
from .channels import channel_options
from .dataplane import Servicer, serve


class Servers:
    def __init__(self, servicer: Servicer, max_message_bytes: int, reduce_timeout_s: float):
        self.servicer, self.max_message_bytes, self.timeout_s = servicer, max_message_bytes, reduce_timeout_s
        self.grpc: grpc.aio.Server | None = None
        self.bulk: BulkServer | None = None

    async def start(self, host: str, port: int, bulk_port: int) -> tuple[int, int | None]:
        """Listen on host:port (gRPC) and host:bulk_port (bulk; -1: none); port 0 takes any free
        port. Returns the ports bound. SwarmStartError, naming the option, if one is taken."""
        # No SO_REUSEPORT: a port already in use must be an error, not a silently shared port.
        self.grpc = grpc.aio.server(options=channel_options(self.max_message_bytes) + [("grpc.so_reuseport", 0)])
        serve(self.servicer, self.grpc)
        try:
            trust = self.servicer.trust  # a closed run: both ports speak TLS with the run's CA (trust.py)
            port = (self.grpc.add_insecure_port(f"{host}:{port}") if trust is None else
                    self.grpc.add_secure_port(f"{host}:{port}", trust.grpc_server_credentials()))
            if port == 0:
                raise RuntimeError("bind failed")
        except RuntimeError as exc:
            raise SwarmStartError(f"cannot listen on {host}:{port} ({exc}); choose another --port, "
                                  f"or 0 for any free port") from None
        await self.grpc.start()
        if bulk_port < 0:
            return port, None
        trust = self.servicer.trust
        self.bulk = (BulkServer(self.servicer.reduce_bulk, self.max_message_bytes, self.timeout_s) if trust is None else
                     BulkServer(self.servicer.reduce_bulk, self.max_message_bytes, self.timeout_s,
                                ssl=trust.server_ssl(), encryption=trust.bulk_encryption,
                                refused=lambda who, why: trust.log_refusal("bulk port", who, why)))
        try:
            return port, await self.bulk.start(host, bulk_port)
        except OSError as exc:
            raise SwarmStartError(f"cannot listen on {host}:{bulk_port} ({exc.strerror or exc}); choose another "
                                  f"--bulk-port, 0 for any free port, or -1 for none") from None

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.bulk is not None:
            await self.bulk.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace=grace_s)


def address(host: str, port: int, bulk_port: int | None) -> str:
    return f"{host}:{port}" if bulk_port is None else f"{host}:{port}+{bulk_port}"

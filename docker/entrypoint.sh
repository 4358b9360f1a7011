#!/usr/bin/env bash
# The image's entry point (installed as /usr/local/bin/p2pdiloco-entrypoint):
#
#   (nothing), peer [options], or options   p2pdiloco peer <options from the environment> [options]
#   status [options]                          p2pdiloco status through the join directory's peers
#   healthcheck                               exit 0 once this container's peer is live
#   anything else                             run it as given (bash, p2pdiloco simulate ...)
#
# Options given to the container come after the environment's and so win (the last value counts).
# The peer is exec'd: it replaces this script, so `docker stop`'s SIGTERM reaches it, and it
# finishes its step, leaves the DHT, removes its join file, writes its checkpoint and exits 0.
#
# Environment (all optional):
#   P2PDILOCO_RUN_ID          run name                                   p2pdiloco
#   P2PDILOCO_PROFILE         --profile: a name from peers/ or a file      none
#   P2PDILOCO_DEVICE          --device auto|cpu|cuda|mps                  the profile's, else auto
#   P2PDILOCO_HOST            address to listen on                       0.0.0.0
#   P2PDILOCO_ANNOUNCE_HOST   address other peers reach this one at      this container's IP
#   P2PDILOCO_PORT            gRPC data plane port                       7000
#   P2PDILOCO_DHT_PORT        libp2p DHT port                            7001
#   P2PDILOCO_BULK_PORT       Reduce's bulk port (-1: none)              7002
#   P2PDILOCO_JOIN_DIR        shared folder of live peers' addresses     /swarm/join ("": none)
#   P2PDILOCO_INITIAL_PEERS   multiaddrs to join through instead         none
#   P2PDILOCO_CHECKPOINT_DIR  where checkpoints go                       /checkpoints
#   P2PDILOCO_DATA            --data paths                               /data if it holds files
#   P2PDILOCO_ARGS            more peer options (split on whitespace)    none
set -euo pipefail
shopt -s nullglob

join_dir=${P2PDILOCO_JOIN_DIR-/swarm/join}
run_id=${P2PDILOCO_RUN_ID:-p2pdiloco}
started=${TMPDIR:-/tmp}/p2pdiloco.started  # holds the announced host; written just before the peer starts

container_ip() {
    python3 -c 'import socket; print(socket.gethostbyname(socket.gethostname()))' 2>/dev/null || {
        echo "p2pdiloco-entrypoint: cannot resolve this container's hostname; set P2PDILOCO_ANNOUNCE_HOST" >&2
        exit 2
    }
}

# Healthy once a join file written after this container started holds this container's DHT
# address: the peer is live and others can join through it. Files left by earlier containers
# (even at the same IP) do not count.
healthcheck() {
    [ -f "$started" ] || exit 1
    local host f
    host=$(cat "$started")
    for f in "$join_dir"/*.maddr; do
        if [ "$f" -nt "$started" ] && grep -qF "/$host/tcp/" "$f"; then
            exit 0
        fi
    done
    exit 1
}

# `p2pdiloco status` through the announced address of every peer listed in the join directory,
# newest first (the first line of each file), unless --initial-peers is given.
status() {
    local peers=() files=() f
    if [[ " $* " != *" --initial-peers "* ]]; then
        files=("$join_dir"/*.maddr)
        if [ ${#files[@]} -gt 0 ]; then
            # shellcheck disable=SC2045  # join files are named <peer id>.maddr: no spaces
            for f in $(ls -t "${files[@]}"); do
                peers+=("$(head -n 1 "$f")")
            done
        fi
        if [ ${#peers[@]} -eq 0 ]; then
            echo "p2pdiloco-entrypoint: no live peers listed in ${join_dir:-(no join dir)}; pass --initial-peers MADDR" >&2
            exit 2
        fi
        set -- --initial-peers "${peers[@]}" "$@"
    fi
    exec p2pdiloco status --run-id "$run_id" "$@"
}

case "${1:-}" in
    "" | -*) ;;
    peer) shift ;;
    status) shift; status "$@" ;;
    healthcheck) healthcheck ;;
    *) exec "$@" ;;
esac

announce=${P2PDILOCO_ANNOUNCE_HOST:-}
if [ -z "$announce" ]; then
    announce=$(container_ip)
    case "$announce" in
        127.*) echo "p2pdiloco-entrypoint: this container's address is $announce (host networking?), which other" \
                    "machines cannot reach: set P2PDILOCO_ANNOUNCE_HOST to this machine's address" >&2 ;;
    esac
fi
args=(peer --run-id "$run_id"
      --host "${P2PDILOCO_HOST:-0.0.0.0}" --announce-host "$announce"
      --port "${P2PDILOCO_PORT:-7000}" --dht-port "${P2PDILOCO_DHT_PORT:-7001}"
      --bulk-port "${P2PDILOCO_BULK_PORT:-7002}"
      --checkpoint-dir "${P2PDILOCO_CHECKPOINT_DIR:-/checkpoints}")
if [ -n "$join_dir" ]; then
    args+=(--join-dir "$join_dir")
fi
# The list variables are split on whitespace (read -a: never globbed).
read -ra words <<< "${P2PDILOCO_INITIAL_PEERS:-}"
if [ ${#words[@]} -gt 0 ]; then
    args+=(--initial-peers "${words[@]}")
fi
if [ -n "${P2PDILOCO_PROFILE:-}" ]; then
    args+=(--profile "$P2PDILOCO_PROFILE")
fi
if [ -n "${P2PDILOCO_DEVICE:-}" ]; then
    args+=(--device "$P2PDILOCO_DEVICE")
fi
data=${P2PDILOCO_DATA:-}
if [ -z "$data" ] && [ -d /data ] && [ -n "$(ls -A /data 2>/dev/null)" ]; then
    data=/data
fi
read -ra words <<< "$data"
if [ ${#words[@]} -gt 0 ]; then
    args+=(--data "${words[@]}")
fi
read -ra words <<< "${P2PDILOCO_ARGS:-}"
args+=("${words[@]}")

echo "$announce" > "$started"
echo "p2pdiloco-entrypoint: p2pdiloco ${args[*]} $*" >&2
exec p2pdiloco "${args[@]}" "$@"

"""`p2pdiloco keygen` and `p2pdiloco admit`: a closed run's keys and admissions (admission.py)."""
from __future__ import annotations

from pathlib import Path

from .admission import CA_KEY, DEFAULT_DAYS, PEER_CA, PEER_CERT, PEER_CSR


def add_parsers(sub) -> None:
    keygen = sub.add_parser("keygen", help="a closed run's CA (--run DIR), or a peer's keys and request (--peer DIR)")
    which = keygen.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="DIR", help="make the run's CA here: ca.key (mode 0600; keep it private) "
                       "and ca.pem")
    which.add_argument("--peer", metavar="DIR", help="make this peer's identity.key (its libp2p peer id; kept if "
                       "present), peer.key (0600) and peer.csr, the request to send to the run's owner")
    keygen.add_argument("--identity", metavar="FILE", help="with --peer: the peer's existing libp2p identity file "
                        "instead of DIR/identity.key")
    keygen.add_argument("--name", default="p2pdiloco run", help="with --run: the CA's name")
    keygen.set_defaults(threads=0)
    admit = sub.add_parser("admit", help="the run's owner admits a peer: signs its request with the run's CA")
    admit.add_argument("--ca", metavar="RUNDIR", required=True, help="the run's folder made by `keygen --run`")
    admit.add_argument("--request", metavar="CSR", required=True, help="the peer's peer.csr")
    admit.add_argument("--out", metavar="PEM", required=True, help="the peer's certificate (e.g. DIR/peer.pem); the "
                       "run's CA certificate is written beside it as run-ca.pem")
    admit.add_argument("--days", type=float, default=DEFAULT_DAYS, help="how long the admission is valid "
                       "(default: %(default)s; re-admit before it ends)")
    admit.set_defaults(threads=0)


def run(args) -> int:
    from .admission import admit, make_peer_request, make_run_ca
    if args.command == "admit":
        peer_id = admit(args.ca, args.request, args.out, args.days)
        print(f"admitted peer {peer_id} for {args.days:g} days: {args.out} (give the peer this file and "
              f"{Path(args.out).parent / PEER_CA})")
        return 0
    if args.run:
        print(f"run CA: {make_run_ca(args.run, args.name)}; keep {Path(args.run) / CA_KEY} private")
        return 0
    peer_id = make_peer_request(args.peer, args.identity)
    d = Path(args.peer)
    print(f"peer {peer_id}: send {d / PEER_CSR} to the run's owner, who runs\n"
          f"  p2pdiloco admit --ca RUNDIR --request {d / PEER_CSR} --out {d / PEER_CERT}\n"
          f"then start this peer with --admission {d}"
          + (f" --identity {args.identity}" if args.identity else ""))
    return 0

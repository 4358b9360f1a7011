"""`p2pdiloco bench allreduce` as a black box, at a tiny size: every method averages correctly."""
import json
import os
import subprocess
import sys

PY = [sys.executable, "-m", "p2pdiloco.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, **kw):
    return subprocess.run(PY + args, capture_output=True, text=True, timeout=400, env=ENV, **kw)


def test_bench_allreduce_all_methods_small(tmp_path):
    out = tmp_path / "a.json"
    r = run(["bench", "allreduce", "--peers", "2", "--numel", "20000", "--repeats", "2", "--json", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["peers"] == 2 and res["numel"] == 20000 and res["repeats"] == 2 and res["bandwidth"] is None
    assert sorted(res["methods"]) == sorted(["p2pdiloco_fp32", "p2pdiloco_e3m0", "gloo", "hivemind"])
    ring = 2 * (2 - 1) / 2 * 20000 * 4
    for name, m in res["methods"].items():
        assert m["error"] is None, (name, m["error"])
        assert 0 < m["seconds"] < 60 and len(m["all_seconds"]) == 2
        assert min(m["all_seconds"]) <= m["seconds"] <= max(m["all_seconds"])
        assert isinstance(m["bytes_sent_per_peer"], int)
    for name in ("gloo", "hivemind"):
        assert res["methods"][name]["bytes_sent_per_peer"] == ring
    fp32, e3m0 = res["methods"]["p2pdiloco_fp32"], res["methods"]["p2pdiloco_e3m0"]
    # exact payload bytes: the ring's values plus an 8-byte header per message (2 per peer for 2 peers)
    assert fp32["bytes_sent_per_peer"] == ring + 2 * 8
    assert e3m0["bytes_sent_per_peer"] < fp32["bytes_sent_per_peer"] / 7
    for name in ("p2pdiloco_fp32", "gloo", "hivemind"):
        assert res["methods"][name]["max_abs_error"] <= 1e-5
    assert 0 < e3m0["max_rel_error"] < 0.35
    assert "p2pdiloco_fp32" in r.stdout and "vs gloo" in r.stdout  # the table


def test_bench_allreduce_bad_input_is_one_clear_line(tmp_path):
    for args, match in [(["--bandwidth", "fast"], "--bandwidth 'fast'"), (["--methods", "mpi"], "--methods: 'mpi'"),
                        (["--peers", "1"], "--peers must be")]:
        r = run(["bench", "allreduce", "--json", str(tmp_path / "x.json"), *args])
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_allreduce_extra_methods(tmp_path):
    """The `_grpc_` methods run Reduce over gRPC (as --bulk-port -1 does); e3m0-huffman sends
    fewer bytes than e3m0 for the same means."""
    out = tmp_path / "g.json"
    r = run(["bench", "allreduce", "--peers", "2", "--numel", "20000", "--repeats", "1", "--methods",
             "p2pdiloco_grpc_fp32", "p2pdiloco_grpc_e3m0", "p2pdiloco_e3m0-huffman", "--json", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(out.read_text())["methods"]
    assert all(v["error"] is None for v in m.values())
    assert m["p2pdiloco_e3m0-huffman"]["max_rel_error"] == m["p2pdiloco_grpc_e3m0"]["max_rel_error"]
    assert m["p2pdiloco_e3m0-huffman"]["bytes_sent_per_peer"] < 0.95 * m["p2pdiloco_grpc_e3m0"]["bytes_sent_per_peer"]
    assert m["p2pdiloco_grpc_fp32"]["bytes_sent_per_peer"] == 2 * (2 - 1) / 2 * 20000 * 4 + 2 * 8
    assert m["p2pdiloco_grpc_fp32"]["max_abs_error"] <= 1e-5

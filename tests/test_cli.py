"""The command line as a black box: real processes, real files."""
import json
import subprocess
import sys

import pytest

PY = [sys.executable, "-m", "p2pdiloco.cli"]


def run(args, **kw):
    return subprocess.run(PY + args, capture_output=True, text=True, timeout=300, **kw)


def test_simulate_writes_summary(tmp_path, text_file):
    out = tmp_path / "s.json"
    r = run(["simulate", "--model", "micro", "--data", str(text_file), "--seq-len", "32", "--steps", "8",
             "--batch-size", "2", "--workers", "2", "--H", "4", "--fragments", "2", "--eval-every", "4",
             "--json", str(out)])
    assert r.returncode == 0, r.stderr
    summary = json.loads(out.read_text())
    for key in ("eval_loss", "eval_loss_initial", "tokens", "bytes_sent_per_worker", "peak_sync_bytes", "wall_s"):
        assert key in summary
    assert summary["tokens"] == 8 * 2 * 2 * 32
    assert summary["eval_loss"] < summary["eval_loss_initial"]
    assert "step 8/8" in r.stderr  # progress is shown


def test_bench_quality_smoke_schema_and_plot(tmp_path, text_file):
    out = tmp_path / "q.json"
    r = run(["bench", "quality", "--preset", "smoke", "--data", str(text_file), "--seq-len", "32",
             "--steps", "20", "--eval-every", "10", "--H", "10", "--json", str(out)])
    assert r.returncode == 0, r.stderr
    q = json.loads(out.read_text())
    assert q["preset"] == "smoke" and q["workers"] == 4 and q["H"] == 10 and q["fragments"] == 2
    names = ["data_parallel", "diloco", "streaming", "streaming_overlap_e3m0", "streaming_overlap_e3m0_eager"]
    assert sorted(q["methods"]) == sorted(names)
    for m in q["methods"].values():
        for key in ("eval_loss", "bytes_sent_per_worker", "peak_sync_bytes", "tokens", "wall_s"):
            assert key in m
    tokens = {m["tokens"] for m in q["methods"].values()}
    assert len(tokens) == 1  # identical tokens for every method
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_bench_quality_jobs_run_methods_side_by_side_with_the_same_results(tmp_path, text_file):
    common = ["bench", "quality", "--preset", "smoke", "--data", str(text_file), "--seq-len", "32", "--steps", "20",
              "--eval-every", "10", "--H", "10", "--threads", "1", "--methods", "streaming_overlap_e3m0", "diloco"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    r = run(common + ["--json", str(one)])
    assert r.returncode == 0, r.stderr
    r = run(common + ["--jobs", "2", "--json", str(two)])
    assert r.returncode == 0, r.stderr
    assert "[diloco] step 20/20" in r.stderr and "[streaming_overlap_e3m0] step 20/20" in r.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert list(b["methods"]) == ["streaming_overlap_e3m0", "diloco"]  # the order asked for
    for name in a["methods"]:
        for key in ("eval_curve", "bytes_sent_per_worker", "peak_sync_bytes", "tokens"):
            assert a["methods"][name][key] == b["methods"][name][key], (name, key)
    assert a["ratios"] == b["ratios"]


@pytest.mark.parametrize("args,match", [
    (["bench", "quality", "--jobs", "0", "--json", "x.json"], "--jobs must be at least 1"),
    (["bench", "quality", "--tau", "0", "--json", "x.json"], "streaming.eager needs streaming.tau"),
    (["simulate", "--tau", "30", "--H", "30"], "streaming.tau"),
    (["simulate", "--fragments", "9"], "streaming.fragments"),
    (["simulate", "--data", "/nonexistent/corpus"], "does not exist"),
    (["bench", "quality", "--methods", "sgd", "--json", "x.json"], "--methods: 'sgd' is unknown"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, match):
    r = run(args, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert match in r.stderr


def test_config_file_and_override(tmp_path, text_file):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "micro"\nsteps = 4\nbatch_size = 2\nworkers = 2\neval_every = 2\n'
                   f'[data]\npaths = ["{text_file}"]\nseq_len = 32\n[streaming]\nH = 2\nfragments = 1\ntau = 0\n')
    r = run(["simulate", "--config", str(cfg), "--steps", "6", "--json", str(tmp_path / "o.json")])
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.json").read_text())["config"]["steps"] == 6
    (tmp_path / "bad.toml").write_text("[streaming]\nhorizon = 3\n")
    r = run(["simulate", "--config", str(tmp_path / "bad.toml")])
    assert r.returncode == 2 and "unknown field 'streaming.horizon'" in r.stderr
    (tmp_path / "bad2.toml").write_text("steps = 'many'\n")
    r = run(["simulate", "--config", str(tmp_path / "bad2.toml")])
    assert r.returncode == 2 and "'steps' must be int" in r.stderr

"""Engine semantics: τ/α merge, eager updates, DiLoCo(H=1) = data-parallel, determinism, faults."""
from dataclasses import replace

import pytest
import torch

from p2pdiloco.aggregation import AggregateConfig
from p2pdiloco.data import DataConfig
from p2pdiloco.inner import InnerConfig
from p2pdiloco.outer import OuterConfig
from p2pdiloco.simulate import SimConfig, Simulation, run_simulation
from p2pdiloco.streaming import StreamingConfig


def sim_config(text_file, **streaming):
    return SimConfig(model="micro", workers=3, steps=12, batch_size=2, eval_every=6, eval_batches=2,
                     data=DataConfig(paths=(str(text_file),), seq_len=32),
                     inner=InnerConfig(lr=3e-3, warmup_steps=2),
                     outer=OuterConfig(lr=0.7, momentum=0.9),
                     streaming=StreamingConfig(**streaming),
                     aggregate=AggregateConfig(method="mean"))  # engine semantics: the plain mean's arithmetic


def params(worker):
    return torch.cat([p.detach().reshape(-1).clone() for p in worker.model.parameters()])


def half_step(sim):
    """Phases 1-2 of a step on every worker (inner step), leaving syncs to the test."""
    for w, s in zip(sim.workers, sim.samplers):
        w.forward_backward(*s.next())
    for w in sim.workers:
        w.optimizer_step()


def test_overlap_applies_mean_tau_steps_later_with_alpha(text_file, small_corpus):
    cfg = replace(sim_config(text_file, H=4, fragments=1, tau=1, alpha=0.3, codec="fp32"),
                  outer=OuterConfig(lr=1.0, momentum=0.0))
    sim = Simulation(cfg, small_corpus)
    start = params(sim.workers[0])
    for _ in range(3):
        sim.train_step()
    half_step(sim)  # step 4: fragment 0 is due
    sent = [params(w) for w in sim.workers]
    for w in sim.workers:
        w.send_due()
        w.apply_due()  # nothing yet: τ = 1
    assert all(torch.equal(params(w), s) for w, s in zip(sim.workers, sent))
    half_step(sim)  # step 5: the mean lands
    before = [params(w) for w in sim.workers]
    for w in sim.workers:
        w.send_due()
        w.apply_due()
    new_global = torch.stack(sent).mean(0)  # outer lr 1, momentum 0: the mean of the replicas
    assert torch.allclose(sim.workers[0].global_params[0], new_global, atol=1e-6)
    for w, b in zip(sim.workers, before):
        assert torch.allclose(params(w), 0.3 * b + 0.7 * new_global, atol=1e-6)
    assert not torch.equal(new_global, start)


def test_diloco_restarts_every_replica_from_the_same_global(text_file, small_corpus):
    sim = Simulation(sim_config(text_file, H=3, fragments=1, tau=0, alpha=0.0, codec="e3m0"), small_corpus)
    for _ in range(3):
        sim.train_step()
    first = params(sim.workers[0])
    assert all(torch.equal(params(w), first) for w in sim.workers)
    assert all(torch.equal(w.global_params[0], first) for w in sim.workers)


def test_eager_trains_from_own_outer_step_then_swaps_base(text_file, small_corpus):
    cfg = replace(sim_config(text_file, H=4, fragments=1, tau=1, alpha=0.5, eager=True, codec="fp32"),
                  outer=OuterConfig(lr=0.5, momentum=0.0))
    sim = Simulation(cfg, small_corpus)
    for _ in range(3):
        sim.train_step()
    half_step(sim)
    g0 = sim.workers[0].global_params[0].clone()
    locals_ = [params(w) for w in sim.workers]
    for w in sim.workers:
        w.send_due()
    proxies = [g0 - 0.5 * (g0 - l) for l in locals_]
    assert all(torch.allclose(params(w), p, atol=1e-6) for w, p in zip(sim.workers, proxies))
    half_step(sim)
    progressed = [params(w) for w in sim.workers]
    for w in sim.workers:
        w.apply_due()
    new_global = g0 - 0.5 * (g0 - torch.stack(locals_).mean(0))
    for w, p, proxy in zip(sim.workers, progressed, proxies):
        assert torch.allclose(params(w), new_global + (p - proxy), atol=1e-5)


def test_diloco_h1_outer_lr1_is_data_parallel(text_file, small_corpus):
    common = dict(inner=InnerConfig(optimizer="sgd", lr=0.05, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0),
                  steps=6)
    dp = Simulation(replace(sim_config(text_file, mode="data_parallel", codec="fp32"), **common), small_corpus)
    diloco = Simulation(replace(sim_config(text_file, H=1, fragments=1, tau=0, alpha=0.0, codec="fp32"),
                                outer=OuterConfig(lr=1.0, momentum=0.0), **common), small_corpus)
    # Data-parallel's gradients travel in bf16 like a real bf16 all-reduce; make them fp32 here.
    for w in dp.workers:
        w.grad_codec = diloco.workers[0].codec
    for _ in range(6):
        dp.train_step()
        diloco.train_step()
    assert torch.allclose(params(dp.workers[0]), params(diloco.workers[0]), atol=1e-6)
    assert not torch.equal(params(dp.workers[0]), params(Simulation(replace(sim_config(text_file), **common), small_corpus).workers[0]))


def test_same_seed_same_result(text_file, small_corpus):
    cfg = sim_config(text_file, H=4, fragments=2, tau=1, alpha=0.5, codec="e3m0")
    a = run_simulation(cfg, small_corpus, progress=None)
    b = run_simulation(cfg, small_corpus, progress=None)
    assert a["eval_curve"] == b["eval_curve"] and a["bytes_sent_per_worker"] == b["bytes_sent_per_worker"]
    c = run_simulation(replace(cfg, seed=1), small_corpus, progress=None)
    assert c["eval_curve"] != a["eval_curve"]


def test_huffman_coded_e3m0_trains_the_same_model_for_fewer_bytes(text_file, small_corpus):
    from p2pdiloco.averaging import member_bytes
    from p2pdiloco.bench_quality import ratios
    from p2pdiloco.codecs import get_codec

    cfg = sim_config(text_file, H=4, fragments=2, tau=1, alpha=0.5, codec="e3m0")
    plain = run_simulation(cfg, small_corpus, progress=None)
    coded = run_simulation(replace(cfg, streaming=replace(cfg.streaming, codec="e3m0-huffman")), small_corpus, progress=None)
    assert coded["eval_curve"] == plain["eval_curve"]  # lossless: the same values, bit for bit
    assert coded["bytes_sent_per_worker"] < plain["bytes_sent_per_worker"]
    # A fixed-size codec's measured sync costs are its analytic ones; the coded ones are less.
    for p, c in zip(plain["fragments"], coded["fragments"]):
        assert p["bytes_per_sync"] == max(member_bytes(get_codec("e3m0"), p["numel"], cfg.workers, i)
                                          for i in range(cfg.workers))
        assert 0 < c["bytes_per_sync"] < p["bytes_per_sync"]
    dp = run_simulation(replace(cfg, streaming=replace(cfg.streaming, mode="data_parallel")), small_corpus, progress=None)
    assert all(f["bytes_per_sync"] is None for f in dp["fragments"])  # data-parallel syncs no fragment
    r = ratios({"data_parallel": dp, "plain": plain, "coded": coded}, cfg)
    per_h = {k: v["bytes_fewer_than_data_parallel_per_H_steps"] for k, v in r.items()}
    assert per_h["plain"] < 4 * cfg.streaming.H < per_h["coded"]  # 4H: 4 bits with no scales or headers


def test_all_workers_share_the_global_parameters(text_file, small_corpus):
    sim = Simulation(sim_config(text_file, H=6, fragments=2, tau=1, alpha=0.5, codec="e3m0"), small_corpus)
    for _ in range(11):
        sim.train_step()
    for f in range(len(sim.workers[0].fragments)):
        assert all(torch.equal(w.global_params[f], sim.workers[0].global_params[f]) for w in sim.workers)
    sim.train_step()  # the last step: a final sync of every fragment, replicas restart from it
    final = params(sim.workers[0])
    assert all(torch.equal(params(w), final) for w in sim.workers)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in sim.global_model().parameters()]), final)
    assert not sim.workers[0].in_flight


def test_late_average_is_skipped_and_caught_up(text_file, small_corpus):
    cfg = sim_config(text_file, H=4, fragments=1, tau=1, alpha=0.5, codec="fp32", timeout_s=0.05)
    sim = Simulation(cfg, small_corpus)
    sim.averager.expected.append("ghost")  # a member that never submits: no round can complete
    for _ in range(4):
        sim.train_step()
    half_step(sim)
    before = [params(w) for w in sim.workers]
    for w in sim.workers:
        w.send_due()
        w.apply_due()
    assert all(w.skipped_rounds == 1 for w in sim.workers)
    assert all(torch.equal(params(w), b) for w, b in zip(sim.workers, before))  # local fragment kept
    assert all(w.tokens_since[0] == w.tokens for w in sim.workers)  # next round carries both rounds' work
    assert all(torch.count_nonzero(w.residuals[0]) == 0 for w in sim.workers)  # fp32: nothing dropped
    sim.averager.drop("ghost")
    for _ in range(4):
        sim.train_step()
    assert all(w.skipped_rounds == 1 for w in sim.workers)


def test_error_feedback_carries_the_codec_error(text_file, small_corpus):
    cfg = sim_config(text_file, H=3, fragments=1, tau=0, alpha=0.0, codec="e3m0")
    sim = Simulation(cfg, small_corpus)
    w = sim.workers[0]
    sent = []
    w.averager = _Recorder(w.averager, sent)
    for _ in range(6):
        sim.train_step()
    # Round 2 sent Δ₂ + (what round 1 dropped); the residual is what round 2 dropped in turn.
    assert len(sent) == 2
    first, second = sent
    assert torch.count_nonzero(w.residuals[0]) > 0
    target = second + w.residuals[0]  # what round 2 meant to send: decoded + dropped
    bound = torch.maximum(target.abs() / 3, target.abs().max().expand_as(target) / 64)
    assert (w.residuals[0].abs() <= bound * (1 + 1e-5)).all()
    no_ef = Simulation(sim_config(text_file, H=3, fragments=1, tau=0, alpha=0.0, codec="e3m0",
                                  error_feedback=False), small_corpus)
    assert no_ef.workers[0].residuals is None


class _Recorder:
    def __init__(self, inner, sent):
        self.inner, self.sent = inner, sent

    def submit(self, key, encoded, weight):
        self.sent.append(encoded.decode())
        return self.inner.submit(key, encoded, weight)

    def ahead(self, key, steps, step_s, ceiling):
        self.inner.ahead(key, steps, step_s, ceiling)


@pytest.mark.parametrize("kwargs,match", [
    (dict(H=10, fragments=2, tau=4), "streaming.tau"),
    (dict(fragments=9), "streaming.fragments .9. must be between 1 and the model's 4 blocks"),
    (dict(codec="fp8"), "codec 'fp8' is unknown"),
    (dict(tau=0, eager=True), "streaming.eager"),
    (dict(alpha=1.5), "streaming.alpha"),
    (dict(mode="async"), "streaming.mode"),
])
def test_bad_streaming_configs(text_file, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sim_config(text_file, **kwargs).validate()


def test_a_diverged_fragment_is_not_sent_and_restarts_from_the_global_copy(text_file, small_corpus):
    cfg = sim_config(text_file, H=4, fragments=1, tau=1, alpha=0.5, codec="e3m0", timeout_s=0.05)
    sim = Simulation(cfg, small_corpus)
    sim.averager.drop("worker2")  # the diverged worker sits the round out; the others average
    for _ in range(3):
        sim.train_step()
    half_step(sim)
    bad = sim.workers[2]
    with torch.no_grad():
        next(bad.model.parameters()).view(-1)[0] = float("nan")
    for w in sim.workers:
        w.send_due()
        w.apply_due()
    assert bad.skipped_rounds == 1 and 0 in bad.missed
    assert torch.isfinite(params(bad)).all()
    torch.testing.assert_close(params(bad), bad.global_params[0], rtol=0, atol=0)  # restarted from global
    assert all(w.skipped_rounds == 0 for w in sim.workers[:2])


@pytest.mark.parametrize("eager", [False, True])
def test_a_data_parallel_warm_start_ending_on_a_due_step_skips_that_empty_round(text_file, small_corpus, eager):
    # Fragment 0 is due at steps 4, 8, 12 and the warm start ends at 4: that round would have no Δ
    # and zero weight, so no worker sends it; the later rounds average as usual.
    cfg = sim_config(text_file, H=4, fragments=1, tau=1, alpha=0.5, eager=eager, codec="e3m0", dp_warmup_steps=4)
    sim = Simulation(cfg, small_corpus)
    for _ in range(4):
        sim.train_step()
    assert all(not w.in_flight for w in sim.workers)
    switched = sim.workers[0].global_params[0].clone()
    for _ in range(8):
        sim.train_step()
    for w in sim.workers:
        w.send_final()
        w.flush()
    assert all(w.skipped_rounds == 0 and w.applied_rounds[0] == 2 for w in sim.workers)
    # The warm start's gradient all-reduces are the largest syncs; a fragment's are reported apart.
    w = sim.workers[0]
    assert w.peak_sync_bytes == w.bytes_per_sync("grad") > w.peak_fragment_sync_bytes == w.bytes_per_sync(0) > 0
    assert not torch.equal(sim.workers[0].global_params[0], switched)
    for w in sim.workers[1:]:
        torch.testing.assert_close(w.global_params[0], sim.workers[0].global_params[0], rtol=0, atol=0)

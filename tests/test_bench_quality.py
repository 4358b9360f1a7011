"""The quality benchmark's methods: what each fixes and what it takes from the run's options."""
from dataclasses import replace

import pytest

from p2pdiloco.bench_quality import METHODS, method_config
from p2pdiloco.streaming import StreamingConfig


def test_the_methods_as_the_issue_defines_them():
    base = StreamingConfig(H=10, fragments=2)
    dl, st = method_config("diloco", base), method_config("streaming", base)
    assert (dl.fragments, dl.tau, dl.codec) == (1, 0, "fp32") and (st.fragments, st.tau, st.codec) == (2, 0, "fp32")
    for name, eager in (("streaming_overlap_e3m0", False), ("streaming_overlap_e3m0_eager", True)):
        c = method_config(name, base)
        assert (c.tau, c.alpha, c.eager, c.codec) == (1, 0.5, eager, "e3m0")
    assert method_config("data_parallel", replace(base, dp_warmup_steps=5)).dp_warmup_steps == 0


@pytest.mark.parametrize("name", ["streaming_overlap_e3m0", "streaming_overlap_e3m0_eager"])
def test_tau_alpha_and_an_e3m0_codec_given_on_the_command_line_reach_the_overlap_methods(name):
    # They once did not: the methods fixed τ = 1 and α = 0.5, and a run with --alpha 0 ran α = 0.5.
    c = method_config(name, StreamingConfig(H=30, fragments=2, tau=2, alpha=0.0, codec="e3m0-huffman"))
    assert (c.tau, c.alpha, c.codec) == (2, 0.0, "e3m0-huffman")
    assert method_config(name, StreamingConfig(codec="int8")).codec == "e3m0"  # still 4-bit


def test_tau_and_alpha_do_not_touch_the_methods_without_overlap():
    base = StreamingConfig(H=30, fragments=2, tau=2, alpha=0.9)
    for name in ("diloco", "streaming"):
        assert (method_config(name, base).tau, method_config(name, base).alpha) == (0, 0.0)


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="--methods: 'sgd' is unknown; choose from " + ", ".join(METHODS)):
        method_config("sgd", StreamingConfig())

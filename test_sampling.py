"""sampling.py: the default sampler's step count on chains shorter and longer than it, the
number of network calls a loop makes, and the one name every report gives a sampler."""
import pytest
import torch

import ddpm
import sampling


@pytest.mark.parametrize("T, expected", [(1, 1), (20, 20), (49, 49), (50, 50), (51, 50),
                                         (1000, 50)])
def test_the_default_step_count_is_capped_by_the_chain(T, expected):
    """DDIM's default is DEFAULT_STEPS (50), or T itself on a shorter chain; the loop then makes
    exactly that many network calls when the steps divide T."""
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", T))
    steps = sampling.steps_for("ddim", None, d)
    assert steps == expected
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)
    d.ddim_sample_loop(model, (1, 1), steps=steps, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == sampling.network_calls("ddim", steps, d) == len(d.ddim_timesteps(steps))
    assert sampling.network_calls("ddpm", steps, d) == T


def test_an_explicit_step_count_is_kept_or_refused():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 100))
    assert sampling.steps_for("ddim", 7, d) == 7
    with pytest.raises(Exception, match="must be in \\[1, the model's T = 100\\]"):
        sampling.steps_for("ddim", 101, d)


def test_reports_name_the_sampler_one_way():
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 1000))
    assert sampling.describe("ddim", 50, 1.0, d) == "DDIM-50 eta=1"
    assert sampling.describe("ddim", 25, 0.5, d) == "DDIM-25 eta=0.5"
    assert sampling.describe("ddpm", 50, 1.0, d) == "DDPM-1000"

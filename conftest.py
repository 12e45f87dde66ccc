"""Test settings shared by every test file.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci       (default) derandomized: the same examples on every run, so CI is reproducible.
  explore  random seeds and more examples, to hunt for new counterexamples locally.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores: one intra-op thread per test process keeps runs predictable.
torch.set_num_threads(int(os.environ.get("DDPM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw from seeded generators; this also fixes torch's global generator, so that a test
    that forgets one is still reproducible."""
    torch.manual_seed(0)

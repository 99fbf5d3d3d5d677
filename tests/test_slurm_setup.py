"""The test cluster's own set-up decisions (tests/slurm_cluster.py), checked without starting it."""

from __future__ import annotations

import pytest

from tests import slurm_cluster


def test_without_root_the_cluster_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match="needs root"):
        slurm_cluster.start_cluster()


def test_skips_outside_ci_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no slurmd"):
        slurm_cluster.skip_or_fail("no slurmd")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        slurm_cluster.skip_or_fail("no slurmd")


def test_node_memory_is_conservative():
    assert 256 <= slurm_cluster._node_memory_mb() <= 4096

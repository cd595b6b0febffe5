"""spotsafe.cloud.node: the supervisor's own look at its own instance, against real metadata simulators."""

from __future__ import annotations

import pytest

from spotsafe.cloud.node import check
from spotsafe.rehearsal.simulators.aws import AWSSimulator
from spotsafe.rehearsal.simulators.environment import simulated_environment
from spotsafe.rehearsal.simulators.gcp import GCPSimulator


def test_quiet_aws_instance_is_healthy_and_an_armed_one_is_doomed(offline: dict[str, str]) -> None:
    with AWSSimulator() as sim:
        env = {**offline, **simulated_environment(sim)}
        state = check(env)
        assert (state.verdict, state.answered) == ("healthy", ("aws",))
        sim.arm_rebalance()  # a recommendation is not a notice: the node stays
        assert check(env).verdict == "healthy"
        sim.arm("terminate")
        state = check(env)
        assert state.verdict == "doomed"
        assert state.notice is not None and state.notice.action == "terminate"
        assert "aws: terminate notice" in state.detail


def test_auto_probes_and_finds_the_one_cloud_that_answers(offline: dict[str, str]) -> None:
    with GCPSimulator() as sim:
        env = {**offline, "GCE_METADATA_HOST": sim.host}  # SPOTSAFE_SOURCES unset: auto
        assert check(env).verdict == "healthy"
        sim.preempt()
        state = check(env)
        assert (state.verdict, state.answered) == ("doomed", ("gcp",))


def test_nothing_answers_is_unknown(offline: dict[str, str]) -> None:
    # the conftest points every source at a closed loopback port
    state = check(dict(offline))
    assert state.verdict == "unknown"
    assert state.answered == ()
    assert check({**offline, "SPOTSAFE_SOURCES": "none"}).verdict == "unknown"
    named = check({**offline, "SPOTSAFE_SOURCES": "aws,signal"})
    assert named.verdict == "unknown"
    assert "aws: no answer" in named.detail


def test_a_bad_source_name_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown interruption source 'ec2'"):
        check({"SPOTSAFE_SOURCES": "ec2"})

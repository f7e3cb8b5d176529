"""The dispatcher's memory stays flat while peers ask and never read (bench/floods.py's floods
against a real ``augserver serve`` process fed by no-op workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.floods import run_flood, write_job

pytestmark = [pytest.mark.service, pytest.mark.slow]

PREFETCH = 32 << 20  # limits.max_prefetch_bytes of the job
HELD = 64 << 20  # limits.max_held_bytes
SLACK_MIB = 24  # allocator and ZeroMQ noise


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_job(tmp_path_factory.mktemp("floods"), PREFETCH, HELD)


@pytest.mark.parametrize("flood", ["status", "ping"])
def test_a_peer_that_asks_and_never_reads_loses_its_replies_not_our_memory(
    job: Path, flood: str
) -> None:
    result = run_flood(job, flood, seconds=3.0)
    assert result.sent > 1000
    assert result.replies_dropped > 0
    assert result.growth_mib < SLACK_MIB, result


def test_a_client_with_many_streams_and_huge_credits_holds_only_its_budget(job: Path) -> None:
    """8 streams, credits of 2**30 and more granted all the time, nothing read: the client
    gets its byte budget (limits.max_prefetch_bytes) and no more, all streams together."""
    result = run_flood(job, "streams", seconds=3.0)
    assert 0 < result.held_mib <= PREFETCH / 2**20
    assert result.growth_mib < PREFETCH / 2**20 + SLACK_MIB, result

"""The README's main command (``python -m client.programs.quickstart``) end to end, shortened."""

from __future__ import annotations

import re

import pytest

from client.programs import quickstart

pytestmark = pytest.mark.service


def test_quickstart_trains_through_the_service_and_stops_everything(capsys):
    status = quickstart.main(["--steps", "12", "--workers", "1", "--batch-size", "32"])
    out = capsys.readouterr().out
    assert status in (0, 1)  # 0 when the loss fell over the run
    assert "batches/epoch of 32" in out
    rates = [float(r) for r in re.findall(r"([\d.]+) samples/s", out)]
    assert len(rates) == 3 and all(r > 0 for r in rates)  # steps 10 and 12, and the summary
    assert re.search(r"done: 12 steps .* first batch after [\d.]+ s \(start-up and warm-up\), "
                     r"then [\d.]+ samples/s, mean data-wait \d+%; final loss [\d.]+", out)
    assert re.search(r"loss [\d.]+ -> [\d.]+ over 12 steps", out)
    # its local workers share the host: every batch came through shared memory
    assert re.search(r"data path: all [1-9]\d* batches through shared memory", out), out

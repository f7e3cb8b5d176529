"""The digits robustness study (``python -m client.programs.study``) on a tiny budget: one epoch per
method, two corruptions at two severities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.programs.study import digits_split, main
from client.programs.train import METHODS

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_split_is_stratified_and_seeded() -> None:
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    assert len(y_train) == len(x_train)
    assert x_train.shape[1:] == (32, 32, 3) and x_train.dtype == np.uint8
    assert len(x_test) == 360 and len(x_train) == 1437
    assert np.all(np.abs(np.bincount(y_test) - 36) <= 1)  # 20 % of every class
    again = digits_split(seed=0)
    assert np.array_equal(again[3], y_test) and np.array_equal(again[2], x_test)


def test_study_trains_and_evaluates_every_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")  # the study's plot
    out = tmp_path / "study"
    status = main(["--epochs", "1", "--workers", "1", "--out", str(out), "--batch-size", "128",
                   "--corruptions", "gaussian_noise", "contrast", "--severities", "1", "5"])
    printed = capsys.readouterr().out
    assert status == 0
    results = json.loads((out / "study.json").read_text())
    assert list(results) == list(METHODS)
    for method, result in results.items():
        assert set(result["corruptions"]) == {"gaussian_noise", "contrast"}, method
        assert set(result["corruptions"]["contrast"]) == {"1", "5"}
        assert 0 <= result["clean"]["error"] <= 1
        assert result["training"]["steps"] == 12  # ceil(1437 / 128)
        assert method in printed
    assert "clean err %" in printed and "mCE %" in printed and "total time" in printed
    assert sorted(p.name for p in (out / "corrupted").rglob("*.zip")) == sorted(
        f"{n}-{s}.zip" for n in ("contrast", "gaussian_noise") for s in (1, 5))

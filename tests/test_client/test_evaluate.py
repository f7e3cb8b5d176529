"""client.robustness.evaluation and .metrics: RMS calibration error, predict, evaluate, the
reports, and the evaluation program."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from client.programs import evaluate as evaluate_program
from client.programs.models import build_model
from client.robustness.corruptions import corrupt_images
from client.robustness.evaluation import (
    evaluate,
    format_table,
    load_test_set,
    plot_error_vs_severity,
    predict,
    write_json,
)
from client.robustness.metrics import ALEXNET_MEAN_ERRORS, alexnet_baseline, rms_calibration_error

pytestmark = pytest.mark.unit

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


# ------------------------------------------------------------------------------ calibration


def test_rms_perfect_calibration_is_zero() -> None:
    conf = np.full(200, 0.75)
    correct = np.tile([1, 1, 1, 0], 50)
    assert rms_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    # two confidence levels, each bin exactly as accurate as it is confident
    conf = np.r_[np.full(100, 0.9), np.full(100, 0.6)]
    correct = np.r_[np.arange(100) < 90, np.arange(100) < 60]
    assert rms_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)


def test_rms_confidently_wrong_is_one() -> None:
    for n in (1, 99, 250):
        assert rms_calibration_error(np.ones(n), np.zeros(n, bool)) == pytest.approx(1.0)


def test_rms_two_bins_by_hand() -> None:
    conf = np.array([0.9, 0.2, 0.6, 0.4, 0.8])
    correct = np.array([1, 0, 0, 1, 1])
    # sorted: 0.2 (0), 0.4 (1) | 0.6 (0), 0.8 (1), 0.9 (1)   (beta 2: the last bin takes 3)
    # bin 1: conf 0.3, acc 0.5 -> 2/5 * 0.2^2 = 0.016
    # bin 2: conf 2.3/3, acc 2/3 -> 3/5 * 0.1^2 = 0.006
    assert rms_calibration_error(conf, correct, beta=2) == pytest.approx(math.sqrt(0.022))
    # fewer samples than beta: one bin
    assert rms_calibration_error(np.array([0.8, 0.6]), np.array([1, 0])) == pytest.approx(0.2)


def test_rms_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        rms_calibration_error(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least one sample"):
        rms_calibration_error(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="beta must be a positive integer"):
        rms_calibration_error(np.ones(3), np.ones(3), beta=0)


# ------------------------------------------------------------------------------- predict


class ChannelMeans(nn.Module):
    """Logits = the per-channel mean of the (normalised) input; a dropout that would scramble
    them in train mode; a submodule left in eval mode to check modes are restored one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(p=0.9)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.scale = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.scale.weight.copy_(torch.eye(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.drop(self.pool(x).flatten(1)))


def flat_images(values: np.ndarray, size: int = 8) -> np.ndarray:
    """One constant-colour image per row of ``values`` (N x 3 uint8)."""
    return np.broadcast_to(values[:, None, None, :], (len(values), size, size, 3)).copy()


def test_predict_normalises_and_restores_modes() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (7, 3)).astype(np.uint8)
    model = ChannelMeans()
    model.train()
    model.pool.eval()
    probs = predict(model, flat_images(values), mean=MEAN, std=STD, batch_size=3)
    logits = (values / 255.0 - np.array(MEAN)) / np.array(STD)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert probs.dtype == np.float32 and probs.shape == (7, 3)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert model.training and model.drop.training and model.scale.training
    assert not model.pool.training
    assert np.array_equal(probs, predict(model, flat_images(values), mean=MEAN, std=STD))
    model.eval()
    predict(model, flat_images(values), mean=MEAN, std=STD)
    assert not any(m.training for m in model.modules())


def test_predict_bad_input() -> None:
    model = ChannelMeans()
    with pytest.raises(ValueError, match="uint8"):
        predict(model, np.zeros((1, 8, 8, 3), np.float32), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="NHWC"):
        predict(model, np.zeros((8, 8, 3), np.uint8), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="empty"):
        predict(model, np.zeros((0, 8, 8, 3), np.uint8), mean=MEAN, std=STD)


# ------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def data(photos) -> tuple[np.ndarray, np.ndarray]:
    """Twenty 16x16 crops of a real photo with labels 0..2."""
    photo = photos["coffee224"]
    rng = np.random.default_rng(3)
    corners = rng.integers(0, 224 - 16, (20, 2))
    x = np.stack([photo[r : r + 16, c : c + 16] for r, c in corners])
    y = rng.integers(0, 3, 20).astype(np.int64)
    return x, y


def direct_metrics(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Error and RMS calibration computed without predict()."""
    model.eval()
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    t = (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(model(t), 1).numpy()
    correct = p.argmax(1) == y
    return 1.0 - correct.sum() / len(y), rms_calibration_error(p.max(1), correct)


def test_evaluate_structure_and_numbers(data, tmp_path) -> None:
    x, y = data
    model = ChannelMeans()
    names, sevs = ("contrast", "gaussian_noise"), (1, 5)
    result = evaluate(model, x, y, mean=MEAN, std=STD, cache_dir=tmp_path, names=names,
                      severities=sevs, batch_size=8, seed=4)  # fmt: skip
    assert set(result) == {"clean", "corruptions", "mean_corruption_error",
                           "mean_corruption_rms_calibration_error", "settings"}  # fmt: skip
    assert list(result["corruptions"]) == list(names)
    err, cal = direct_metrics(model, x, y)
    assert result["clean"] == {"error": pytest.approx(err), "rms_calibration_error":
                               pytest.approx(cal)}  # fmt: skip
    per_name, cals = [], []
    for name in names:
        assert list(result["corruptions"][name]) == ["1", "5"]
        errs = []
        for s in sevs:
            e, c = direct_metrics(model, corrupt_images(x, name, s, seed=4), y)
            got = result["corruptions"][name][str(s)]
            assert got["error"] == pytest.approx(e) and got["rms_calibration_error"] == (
                pytest.approx(c)
            )
            assert 0.0 <= got["error"] <= 1.0
            errs.append(e)
            cals.append(c)
        per_name.append(np.mean(errs))
    assert result["mean_corruption_error"] == pytest.approx(np.mean(per_name))
    assert result["mean_corruption_rms_calibration_error"] == pytest.approx(np.mean(cals))
    assert result["settings"] == {"num_images": 20, "seed": 4, "params": "cifar",
                                  "names": list(names), "severities": [1, 5]}  # fmt: skip
    assert json.loads(json.dumps(result)) == result


def test_evaluate_normalized_mce_and_progress(data, tmp_path, capsys) -> None:
    x, y = data
    names = ("pixelate", "fog")
    baseline = {"pixelate": [0.5, 0.5, 0.6, 0.7, 0.8], "fog": [0.4, 0.5, 0.6, 0.7, 0.9]}
    result = evaluate(ChannelMeans(), x, y, mean=MEAN, std=STD, cache_dir=tmp_path,
                      names=names, severities=(2, 3), baseline=baseline, progress=True)  # fmt: skip
    c = result["corruptions"]
    expected = np.mean([
        (c[n]["2"]["error"] + c[n]["3"]["error"]) / (baseline[n][1] + baseline[n][2])
        for n in names
    ])  # fmt: skip
    assert result["normalized_mce"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="baseline needs 5 errors for 'fog'"):
        evaluate(ChannelMeans(), x, y, mean=MEAN, std=STD, cache_dir=tmp_path,
                 names=names, baseline={"pixelate": [0.5] * 5})  # fmt: skip
    with pytest.raises(ValueError, match="same length"):
        evaluate(ChannelMeans(), x, y[:-1], mean=MEAN, std=STD, cache_dir=tmp_path)


def test_alexnet_baseline() -> None:
    base = alexnet_baseline()
    assert list(base) == list(ALEXNET_MEAN_ERRORS) and len(base) == 15
    assert base["gaussian_noise"] == [0.886428] * 5 and base["jpeg_compression"][0] == 0.6065


# ------------------------------------------------------------------------------- reports


def fake_result(clean: float, shift: float, normalized: float | None = None) -> dict:
    corr = {
        name: {str(s): {"error": clean + shift * s, "rms_calibration_error": 0.01 * s}
               for s in (1, 2, 3, 4, 5)}
        for name in ("gaussian_noise", "fog", "jpeg_compression")
    }  # fmt: skip
    r = {
        "clean": {"error": clean, "rms_calibration_error": 0.03},
        "corruptions": corr,
        "mean_corruption_error": clean + 3 * shift,
        "mean_corruption_rms_calibration_error": 0.03,
    }
    if normalized is not None:
        r["normalized_mce"] = normalized
    return r


def test_format_table_lists_every_method_and_corruption() -> None:
    results = {"standard": fake_result(0.05, 0.05), "augmix": fake_result(0.05, 0.02),
               "augmix+jsd": fake_result(0.045, 0.01, normalized=0.684)}  # fmt: skip
    text = format_table(results)
    lines = text.splitlines()
    for method in results:
        assert any(line.startswith(method) for line in lines), method
    for name in ("gaussian_noise", "fog", "jpeg_compression"):
        assert any(line.startswith(name) for line in lines), name
    assert "clean err %" in text and "mCE %" in text and "norm. mCE %" in text
    assert "20.00" in text  # standard's mCE: 5 + 3 * 5 %
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:5]}
    assert rows["augmix+jsd"][-1] == "68.40" and rows["standard"][-1] == "-"
    # per-corruption rows: augmix+jsd's gaussian_noise mean error = 4.5 + 3 * 1 %
    row = next(line for line in lines if line.startswith("gaussian_noise"))
    assert row.split()[1:] == ["20.00", "11.00", "7.50"]
    assert format_table({}) == "(no results)"


def test_write_json_round_trips(tmp_path) -> None:
    results = {"augmix": fake_result(0.05, 0.02, normalized=0.7)}
    write_json(results, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == results


def test_plot_with_matplotlib(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert plot_error_vs_severity({"a": fake_result(0.05, 0.05), "b": fake_result(0.04, 0.01)},
                                  path)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_has_a_title_and_a_y_axis_from_zero(tmp_path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: (saved.append(self), original(self, *a, **k)))
    assert plot_error_vs_severity({"a": fake_result(0.3, 0.05)}, tmp_path / "p.png", "run 7")
    (ax,) = saved[0].axes
    assert ax.get_title() == "run 7" and ax.get_ylim()[0] == 0


def test_plot_without_matplotlib(tmp_path, monkeypatch) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                "matplotlib.backends.backend_agg"):  # fmt: skip
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    path = tmp_path / "plot.png"
    assert plot_error_vs_severity({"a": fake_result(0.05, 0.05)}, path) is False
    assert not path.exists()


# ------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(photos, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    ckpt = tmp_path / "augmix.pt"
    checkpoint = {"model": model.state_dict(), "model_name": "small_cnn", "num_classes": 10,
                  "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "method": "augmix"}  # fmt: skip
    torch.save(checkpoint, ckpt)
    photo = photos["coffee224"]
    x = np.stack([photo[i * 10 : i * 10 + 32, i * 7 : i * 7 + 32] for i in range(12)])
    y = np.arange(12, dtype=np.int64) % 10
    npz = tmp_path / "test.npz"
    np.savez(npz, x=x, y=y)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["--checkpoint", str(ckpt), "--test-npz", str(npz), "--cache", str(tmp_path / "c"),
            "--json", str(out_json), "--plot", str(out_png), "--names", "contrast", "fog",
            "--severities", "1", "2", "--batch-size", "5", "--alexnet-baseline"]  # fmt: skip
    assert evaluate_program.main(argv) == 0
    out = capsys.readouterr().out
    assert "augmix" in out and "contrast" in out and "fog" in out and "norm. mCE %" in out
    result = json.loads(out_json.read_text())
    assert set(result["corruptions"]) == {"contrast", "fog"}
    assert result["settings"]["num_images"] == 12
    expected = evaluate(model, x, y, mean=(0.5,) * 3, std=(0.5,) * 3,
                        cache_dir=tmp_path / "c", names=("contrast", "fog"), severities=(1, 2),
                        baseline=alexnet_baseline())  # fmt: skip
    # the record names what was evaluated, then the same numbers (deterministic on CPU)
    assert result.pop("checkpoint") == str(ckpt.resolve()) and result.pop("method") == "augmix"
    job = result.pop("job")
    assert job["test"] == str(npz) and job["severities"] == [1, 2] and job["image_size"] == 32
    assert result == json.loads(json.dumps(expected))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not out_png.exists()
    else:
        assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_no_cache_streams_the_sets_and_writes_nothing(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "model_name": "small_cnn", "num_classes": 10},
               ckpt)
    npz = tmp_path / "t.npz"
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(npz, x=x, y=np.arange(6))
    common = ["--checkpoint", str(ckpt), "--test", str(npz), "--names", "fog",
              "--severities", "2", "--batch-size", "4", "--json"]  # chunks of 4 of 6
    assert evaluate_program.main([*common, str(tmp_path / "a.json"), "--no-cache"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.pt", "t.npz"]
    assert evaluate_program.main([*common, str(tmp_path / "b.json"), "--cache",
                                  str(tmp_path / "c")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["corruptions"] == b["corruptions"]  # streamed or cached: the same numbers
    with pytest.raises(SystemExit):
        evaluate_program.main(common[:-1])  # neither --cache nor --no-cache
    assert "--no-cache" in capsys.readouterr().err


def test_cli_bad_files(tmp_path, capsys) -> None:
    npz = tmp_path / "t.npz"
    np.savez(npz, x=np.zeros((2, 8, 8, 3), np.uint8))
    ckpt = tmp_path / "c.pt"
    torch.save({"model": {}}, ckpt)
    argv = ["--checkpoint", str(ckpt), "--test-npz", str(npz), "--cache", str(tmp_path)]
    assert evaluate_program.main(argv) == 2
    assert "lacks model_name, num_classes" in capsys.readouterr().err
    model = build_model("small_cnn", 10)
    torch.save({"model": model.state_dict(), "model_name": "small_cnn", "num_classes": 10}, ckpt)
    assert evaluate_program.main(argv) == 2
    assert "needs arrays x" in capsys.readouterr().err
    np.savez(npz, x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, 2, 12]))
    torch.save({"model": model.state_dict(), "model_name": "small_cnn", "num_classes": 10}, ckpt)
    assert evaluate_program.main(argv) == 2  # was IndexError: Target 12 is out of bounds
    err = capsys.readouterr().err
    assert "labels 0..12" in err and "has 10 outputs (num_classes)" in err


# ---------------------------------------------------------------------------- test sets


def test_load_test_set_from_an_npz_and_from_dataset_splits(tmp_path) -> None:
    from tests.service_helpers import write_cifar10

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x=x, y=np.arange(12) % 10)
    got_x, got_y = load_test_set(tmp_path / "test.npz")
    assert np.array_equal(got_x, x) and got_y.dtype == np.int64
    sub_x, sub_y = load_test_set(str(tmp_path / "test.npz"), limit=5)
    rows = [next(i for i, r in enumerate(x) if np.array_equal(s, r)) for s in sub_x]
    assert len(set(rows)) == 5 and sub_y.tolist() == [i % 10 for i in rows]
    # CIFAR's test batch, through the CIFAR test-time view (the 32x32 images unchanged)
    batches = write_cifar10(tmp_path / "cifar", x)
    cx, cy = load_test_set(f"cifar10:{tmp_path / 'cifar'}")
    assert np.array_equal(cx, batches[-1]) and cy.tolist() == [(5 + j) % 10 for j in range(12)]
    # the ImageNet view: resize 256, centre crop 224
    ix, _ = load_test_set(f"npz:{tmp_path / 'test.npz'}", preprocess="imagenet", limit=2)
    assert ix.shape == (2, 224, 224, 3)
    with pytest.raises(ValueError, match="needs arrays x"):
        np.savez(tmp_path / "bad.npz", images=x)
        load_test_set(tmp_path / "bad.npz")


def test_cli_evaluates_a_dataset_test_split(tmp_path, capsys) -> None:
    from tests.service_helpers import write_cifar10

    write_cifar10(tmp_path / "cifar", np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3),
                                                                         dtype=np.uint8))
    model = build_model("small_cnn", 10)
    torch.save({"model": model.state_dict(), "model_name": "small_cnn", "num_classes": 10,
                "mean": (0.5,) * 3, "std": (0.5,) * 3, "preprocess": "cifar"},
               tmp_path / "ckpt.pt")  # fmt: skip
    code = evaluate_program.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--test",
                   f"cifar10:{tmp_path / 'cifar'}", "--cache", str(tmp_path / "cache"),
                   "--names", "fog", "--severities", "1", "--json", str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["num_images"] == 8
    assert set(result["corruptions"]) == {"fog"}
    assert "fog" in capsys.readouterr().out

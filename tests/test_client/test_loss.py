"""client.loss: the AugMix Jensen-Shannon consistency loss and splitting the 3B batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from client import jsd_loss, split_views
from client.loss import jsd_loss_from_concat

pytestmark = pytest.mark.unit


def numpy_reference(lc, l1, l2, targets, lam: float) -> float:
    """AugMix loss written out with explicit float64 log-softmax / sum math (no torch)."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max(axis=1, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))

    logs = [log_softmax(np.asarray(x, dtype=np.float64)) for x in (lc, l1, l2)]
    probs = [np.exp(lp) for lp in logs]
    log_m = np.log(np.clip((probs[0] + probs[1] + probs[2]) / 3.0, 1e-7, 1.0))
    batch = logs[0].shape[0]
    # KL(p || M) = sum_k p_k (log p_k - log M_k), averaged over the batch ('batchmean').
    kls = [float((p * (lp - log_m)).sum()) / batch for p, lp in zip(probs, logs, strict=True)]
    ce = -float(logs[0][np.arange(batch), np.asarray(targets)].mean())
    return ce + lam * sum(kls) / 3.0


def authors_reference(lc, l1, l2, targets, lam: float) -> torch.Tensor:
    """The authors' expression verbatim (F.kl_div on probability targets)."""
    p_c, p_1, p_2 = F.softmax(lc, dim=1), F.softmax(l1, dim=1), F.softmax(l2, dim=1)
    log_m = torch.clamp((p_c + p_1 + p_2) / 3.0, 1e-7, 1).log()
    js = (
        F.kl_div(log_m, p_c, reduction="batchmean")
        + F.kl_div(log_m, p_1, reduction="batchmean")
        + F.kl_div(log_m, p_2, reduction="batchmean")
    ) / 3.0
    return F.cross_entropy(lc, targets) + lam * js


def random_views(batch: int, classes: int, scale: float, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, classes, generator=g, dtype=dtype) * scale for _ in range(3)]
    targets = torch.randint(0, classes, (batch,), generator=g)
    return views, targets


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 32),
    classes=st.integers(2, 50),
    scale=st.sampled_from([0.01, 1.0, 5.0, 30.0]),
    lam=st.sampled_from([0.0, 1.0, 12.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_independent_reference(batch, classes, scale, lam, seed):
    (lc, l1, l2), y = random_views(batch, classes, scale, seed)
    got = jsd_loss(lc, l1, l2, y, lam=lam)
    assert got.dtype == torch.float64 and got.shape == ()
    want = numpy_reference(lc.numpy(), l1.numpy(), l2.numpy(), y.numpy(), lam)
    assert math.isclose(got.item(), want, rel_tol=1e-6, abs_tol=1e-6)
    # and the authors' F.kl_div expression, to float rounding
    assert math.isclose(got.item(), authors_reference(lc, l1, l2, y, lam).item(), abs_tol=1e-9)


def test_default_lambda_is_12():
    (lc, l1, l2), y = random_views(8, 10, 3.0, seed=1)
    assert jsd_loss(lc, l1, l2, y).item() == pytest.approx(
        numpy_reference(lc.numpy(), l1.numpy(), l2.numpy(), y.numpy(), 12.0), rel=1e-9
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_finite_loss_and_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    views = []
    for _ in range(3):
        signs = torch.randint(0, 2, (16, 10), generator=g).to(dtype) * 2 - 1
        views.append((signs * 1e4).requires_grad_())
    # rows where the views are confidently different one-hots: probabilities underflow to 0
    for i, v in enumerate(views):
        with torch.no_grad():
            v[0].fill_(-1e4)
            v[0, i] = 1e4
    y = torch.randint(0, 10, (16,), generator=g)
    loss = jsd_loss(*views, y)
    assert torch.isfinite(loss)
    loss.backward()
    for v in views:
        assert v.grad is not None and torch.isfinite(v.grad).all()
    if dtype == torch.float64:
        want = numpy_reference(*(v.detach().numpy() for v in views), y.numpy(), 12.0)
        assert loss.item() == pytest.approx(want, rel=1e-6)


def test_gradients_reach_every_view():
    (lc, l1, l2), y = random_views(6, 7, 2.0, seed=3)
    views = [v.requires_grad_() for v in (lc, l1, l2)]
    jsd_loss(*views, y).backward()
    for v in views:
        assert v.grad is not None and v.grad.abs().sum() > 0


def test_gradients_reach_model_through_concatenated_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    batch = 4
    x_clean, x_aug1, x_aug2 = (torch.randn(batch, 12, requires_grad=True) for _ in range(3))
    y = torch.randint(0, 5, (batch,))
    logits_all = model(torch.cat([x_clean, x_aug1, x_aug2]))
    lc, l1, l2 = split_views(logits_all)
    # split_views returns the views in concatenation order
    assert torch.equal(lc, model(x_clean))
    assert torch.equal(l2, model(x_aug2))
    loss = jsd_loss(lc, l1, l2, y)
    assert loss.item() == pytest.approx(jsd_loss_from_concat(logits_all, y).item(), abs=0)
    # timm's layout of the targets (repeated to 3B) gives the same loss
    assert loss.item() == pytest.approx(jsd_loss_from_concat(logits_all, y.repeat(3)).item(),
                                        abs=0)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for x in (x_clean, x_aug1, x_aug2):
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_lambda_zero_is_plain_cross_entropy():
    (lc, l1, l2), y = random_views(9, 4, 4.0, seed=5)
    assert jsd_loss(lc, l1, l2, y, lam=0.0).item() == F.cross_entropy(lc, y).item()


@pytest.mark.parametrize("scale", [0.1, 3.0, 50.0])
def test_identical_views_have_zero_js(scale):
    (lc, _, _), y = random_views(12, 8, scale, seed=7)
    ce = F.cross_entropy(lc, y).item()
    js = jsd_loss(lc, lc.clone(), lc.clone(), y, lam=1.0).item() - ce
    assert abs(js) <= 1e-7
    # different views do give a positive JS term
    (_, l1, l2), _ = random_views(12, 8, scale, seed=8)
    assert jsd_loss(lc, l1, l2, y, lam=1.0).item() - ce > 1e-4


def test_js_is_bounded_by_log3_and_symmetric_in_aug_views():
    (lc, l1, l2), y = random_views(10, 6, 20.0, seed=9)
    ce = F.cross_entropy(lc, y).item()
    js = jsd_loss(lc, l1, l2, y, lam=1.0).item() - ce
    assert 0 < js <= math.log(3) + 1e-9
    assert jsd_loss(lc, l2, l1, y, lam=1.0).item() == pytest.approx(js + ce, abs=1e-12)


def test_split_views_order_and_count():
    x = torch.arange(12.0).reshape(6, 2)
    a, b, c = split_views(x)
    assert torch.equal(a, x[:2]) and torch.equal(b, x[2:4]) and torch.equal(c, x[4:])
    parts = split_views(x, n_views=2)
    assert len(parts) == 2 and torch.equal(parts[1], x[3:])


@pytest.mark.parametrize("rows, n_views", [(7, 3), (5, 2), (1, 3)])
def test_split_views_rejects_indivisible_batch(rows, n_views):
    with pytest.raises(ValueError, match=f"{rows}.*n_views={n_views}"):
        split_views(torch.zeros(rows, 4), n_views=n_views)


@pytest.mark.parametrize("n_views", [0, -1, 1.5])
def test_split_views_rejects_bad_n_views(n_views):
    with pytest.raises(ValueError, match="n_views"):
        split_views(torch.zeros(6, 4), n_views=n_views)


def test_jsd_loss_from_concat_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        jsd_loss_from_concat(torch.zeros(10, 4), torch.zeros(3, dtype=torch.long))


def _ok():
    (lc, l1, l2), y = random_views(4, 5, 1.0, seed=11)
    return lc, l1, l2, y


@pytest.mark.parametrize(
    "which, bad_shape, name",
    [(1, (4, 6), "logits_aug1"), (2, (3, 5), "logits_aug2"), (2, (4, 5, 1), "logits_aug2")],
)
def test_rejects_view_shape_mismatch(which, bad_shape, name):
    args = list(_ok())
    args[which] = torch.zeros(bad_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        jsd_loss(*args)


def test_rejects_non_2d_clean_logits():
    lc, _, _, y = _ok()
    with pytest.raises(ValueError, match="logits_clean"):
        jsd_loss(lc[0], lc[0], lc[0], y)


@pytest.mark.parametrize(
    "targets", [torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long)]
)
def test_rejects_targets_length(targets):
    lc, l1, l2, _ = _ok()
    with pytest.raises(ValueError, match="targets"):
        jsd_loss(lc, l1, l2, targets)


@pytest.mark.parametrize("lam", [-1.0, -1e-12, float("nan")])
def test_rejects_negative_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        jsd_loss(*_ok(), lam=lam)


def test_rejects_empty_batch_and_integer_logits():
    empty = torch.zeros(0, 5)
    with pytest.raises(ValueError, match="empty"):
        jsd_loss(empty, empty, empty, torch.zeros(0, dtype=torch.long))
    ints = torch.zeros(4, 5, dtype=torch.long)
    lc, l1, _, y = _ok()
    with pytest.raises(TypeError, match="logits_aug2"):
        jsd_loss(lc, l1, ints, y)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_timms(smoothing: float) -> None:
    """timm's JsdCrossEntropy smooths the clean view's labels: (1 - s) * NLL + s * the mean
    of -log p over the classes (its LabelSmoothingCrossEntropy), plus the same JS term."""
    (lc, l1, l2), targets = random_views(16, 7, 3.0, seed=5)
    logp = np.asarray(F.log_softmax(lc, dim=1))
    nll = -logp[np.arange(16), targets.numpy()].mean()
    smooth = -logp.mean(axis=1).mean()
    plain = numpy_reference(lc, l1, l2, targets, 12.0)
    ce = -logp[np.arange(16), targets.numpy()].mean()
    expected = plain - ce + (1 - smoothing) * nll + smoothing * smooth
    got = jsd_loss(lc, l1, l2, targets, smoothing=smoothing)
    assert math.isclose(float(got), expected, rel_tol=1e-9)
    concat = jsd_loss_from_concat(torch.cat([lc, l1, l2]), targets, smoothing=smoothing)
    assert math.isclose(float(concat), expected, rel_tol=1e-9)
    assert float(jsd_loss(lc, l1, l2, targets)) == pytest.approx(plain, rel=1e-9)
    with pytest.raises(ValueError, match="smoothing"):
        jsd_loss(lc, l1, l2, targets, smoothing=1.0)

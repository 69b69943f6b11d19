import numpy as np
import pytest
import torch
from torch import nn

from fuselabel.losses import AsymmetricLoss, FocalLoss, build_loss, pos_weight_from_labels


def _batch(seed=0, n=64, c=18, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * scale
    targets = (torch.rand(n, c, generator=g) < 0.2).to(dtype)
    return logits, targets


def test_focal_gamma0_equals_bce():
    logits, targets = _batch()
    bce = nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, targets), bce)


def test_focal_gamma0_with_pos_weight_equals_bce():
    logits, targets = _batch()
    pw = torch.linspace(0.5, 5.0, 18, dtype=torch.float64)
    bce = nn.BCEWithLogitsLoss(pos_weight=pw)(logits, targets)
    torch.testing.assert_close(FocalLoss(gamma=0.0, pos_weight=pw)(logits, targets), bce, rtol=1e-6, atol=1e-6)


def test_focal_reference_formula():
    logits, targets = _batch(1)
    p = torch.sigmoid(logits)
    pt = p * targets + (1 - p) * (1 - targets)
    at = 0.25 * targets + 0.75 * (1 - targets)
    expected = (-at * (1 - pt) ** 2 * torch.log(pt)).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=0.25)(logits, targets), expected)


def test_focal_downweights_easy_examples():
    logits, targets = _batch(2)
    assert FocalLoss(gamma=2.0)(logits, targets) < nn.BCEWithLogitsLoss()(logits, targets)


def test_asl_no_focusing_no_clip_equals_bce():
    logits, targets = _batch()
    bce = nn.BCEWithLogitsLoss()(logits, targets)
    asl = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    torch.testing.assert_close(asl, bce)
    # float32 too (the usual training dtype)
    l32, t32 = logits.float(), targets.float()
    torch.testing.assert_close(
        AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(l32, t32), nn.BCEWithLogitsLoss()(l32, t32)
    )


def test_asl_reference_formula():
    # Straight transcription of the authors' implementation, divided by the element count.
    logits, targets = _batch(3)
    gamma_neg, gamma_pos, clip, eps = 4.0, 1.0, 0.05, 1e-8
    xs_pos = torch.sigmoid(logits)
    xs_neg = (1 - xs_pos + clip).clamp(max=1)
    loss = targets * torch.log(xs_pos.clamp(min=eps)) + (1 - targets) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * targets + xs_neg * (1 - targets)
    gamma = gamma_pos * targets + gamma_neg * (1 - targets)
    loss = loss * torch.pow(1 - pt, gamma)
    expected = -loss.sum() / loss.numel()
    got = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps)(logits, targets)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_asl_easy_negatives_are_ignored():
    logits = torch.tensor([[-6.0, -5.0]])  # p < clip
    targets = torch.zeros(1, 2)
    assert AsymmetricLoss()(logits, targets).item() == 0.0


@pytest.mark.parametrize(
    "loss",
    [
        nn.BCEWithLogitsLoss(),
        FocalLoss(),
        FocalLoss(gamma=0.5, alpha=0.25),
        AsymmetricLoss(),
        AsymmetricLoss(gamma_pos=0.5, gamma_neg=0.5, clip=0.0),
    ],
    ids=["bce", "focal", "focal_frac", "asl", "asl_frac"],
)
def test_gradients_finite_including_saturated_logits(loss):
    logits = torch.tensor([[-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0]] * 2, dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([[0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    out = loss(logits, targets)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_tiny_linear_model_learns(name):
    torch.manual_seed(0)
    n, d, c = 256, 10, 5
    x = torch.randn(n, d)
    w_true = torch.randn(d, c) * 2
    y = (x @ w_true > 0.5).float()
    model = nn.Linear(d, c)
    loss_fn = build_loss(name, pos_weight=pos_weight_from_labels(y.numpy()))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    final = loss_fn(model(x), y).item()
    assert final < 0.5 * first


def test_build_loss_types_and_kwargs():
    pw = torch.ones(3) * 2
    bce = build_loss("bce", pos_weight=pw)
    assert isinstance(bce, nn.BCEWithLogitsLoss)
    torch.testing.assert_close(bce.pos_weight, pw)
    focal = build_loss("focal", gamma=1.5, alpha=0.3)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and focal.alpha == 0.3
    asl = build_loss("ASL", gamma_neg=2, clip=0.0)
    assert isinstance(asl, AsymmetricLoss) and asl.gamma_neg == 2 and asl.clip == 0.0
    with pytest.raises(ValueError, match="bce.*focal.*asl"):
        build_loss("hinge")


def test_pos_weight_buffer_moves_with_module():
    loss = FocalLoss(pos_weight=torch.ones(4))
    assert "pos_weight" in dict(loss.named_buffers())
    assert loss.to(torch.float64).pos_weight.dtype == torch.float64


def test_pos_weight_from_labels():
    y = np.zeros((100, 4), dtype=int)
    y[:50, 0] = 1  # 50/50 -> 1
    y[:20, 1] = 1  # 80/20 -> 4
    y[:2, 2] = 1  # 98/2 -> 49, clipped to 10
    # column 3 has no positives -> clipped to 10
    w = pos_weight_from_labels(y)
    assert isinstance(w, torch.Tensor) and w.shape == (4,) and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([1.0, 4.0, 10.0, 10.0]))
    torch.testing.assert_close(pos_weight_from_labels(y, clip=3.0), torch.tensor([1.0, 3.0, 3.0, 3.0]))
    y[:90, 0] = 1  # common label -> 10/90
    assert pos_weight_from_labels(y)[0].item() == pytest.approx(10 / 90)

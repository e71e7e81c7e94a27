"""Tests for unet.losses: the paper's weighted cross entropy (arXiv 1505.04597, Eq. 1) and soft Dice."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from octseg.unet.losses import center_crop, soft_dice_loss, weighted_cross_entropy

# One 2x2 image, 2 classes: LOGITS[k][i][j] is the logit of class k at pixel (i, j).
LOGITS = [[[1.0, 0.0], [2.0, -1.0]], [[0.0, 0.0], [0.0, 1.0]]]
TARGET = [[0, 1], [1, 1]]


def hand_nll(i: int, j: int) -> float:
    """-log softmax at pixel (i, j) for its target class, in plain Python."""
    z = [LOGITS[k][i][j] for k in range(2)]
    return -math.log(math.exp(z[TARGET[i][j]]) / (math.exp(z[0]) + math.exp(z[1])))


PIXELS = [(0, 0), (0, 1), (1, 0), (1, 1)]
# By hand: log(1 + e^-1), log 2, log(e^2 + 1), log(1 + e^-2).
NLL = {p: hand_nll(*p) for p in PIXELS}


def logits_target() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([LOGITS]), torch.tensor([TARGET])  # (1, 2, 2, 2), (1, 2, 2)


def test_hand_values_are_what_the_comment_says() -> None:
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(math.exp(2) + 1), math.log(1 + math.exp(-2))]
    assert [NLL[p] for p in PIXELS] == pytest.approx(expected)


@pytest.mark.parametrize(
    "weights, expected",
    [
        (None, sum(NLL.values()) / 4),  # plain mean over the 4 pixels
        ([[1.0, 2.0], [0.5, 0.0]], (NLL[0, 0] + 2 * NLL[0, 1] + 0.5 * NLL[1, 0]) / 4),  # still / 4 pixels
        ([[3.0, 3.0], [3.0, 3.0]], 3 * sum(NLL.values()) / 4),  # uniform weights scale the loss
    ],
)
def test_weighted_ce_matches_hand_computation(weights: list | None, expected: float) -> None:
    logits, target = logits_target()
    w = None if weights is None else torch.tensor([weights])
    assert weighted_cross_entropy(logits, target, w).item() == pytest.approx(expected, rel=1e-6)


def test_ignored_pixels_leave_the_mean() -> None:
    logits, target = logits_target()
    target[0, 1, 0] = 7  # pixel (1, 0) ignored
    loss = weighted_cross_entropy(logits, target, ignore_index=7)
    assert loss.item() == pytest.approx((NLL[0, 0] + NLL[0, 1] + NLL[1, 1]) / 3, rel=1e-6)
    logits[0, :, 1, 0] = torch.tensor([100.0, -100.0])  # whatever the logits at an ignored pixel
    assert weighted_cross_entropy(logits, target, ignore_index=7).item() == pytest.approx(loss.item())


def test_all_ignored_gives_zero_with_a_graph() -> None:
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.full((1, 2, 2), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("ignore", [False, True])
def test_equals_torch_cross_entropy_without_weights(ignore: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 7, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5, 7))
    if ignore:
        target[target == 2] = -100
    ours = weighted_cross_entropy(logits, target)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-12)


def test_gradient_is_weighted_per_pixel() -> None:
    logits, target = logits_target()
    logits.requires_grad_(True)
    weighted_cross_entropy(logits, target, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])).backward()
    grad = logits.grad[0]
    assert torch.count_nonzero(grad[:, 0, 0]) == 2  # only the weighted pixel pulls
    assert torch.count_nonzero(grad[:, 1:, :]) == 0 and torch.count_nonzero(grad[:, 0, 1]) == 0


def test_stable_for_huge_logits() -> None:
    logits = torch.tensor([[[[1000.0]], [[-1000.0]]]])  # (1, 2, 1, 1)
    loss = weighted_cross_entropy(logits, torch.tensor([[[1]]]))
    assert loss.item() == pytest.approx(2000.0)


# ---- input checks ----------------------------------------------------------------------------


def test_larger_target_suggests_center_crop() -> None:
    logits = torch.zeros(2, 2, 4, 4)
    big = torch.zeros(2, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(8, 8\) != logits spatial size \(4, 4\).*center_crop\(target"):
        weighted_cross_entropy(logits, big)
    weights = torch.ones(2, 8, 8)
    with pytest.raises(ValueError, match=r"center_crop\(weights"):
        weighted_cross_entropy(logits, center_crop(big, (4, 4)), weights)
    loss = weighted_cross_entropy(logits, center_crop(big, (4, 4)), center_crop(weights, logits.shape[-2:]))
    assert loss.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    "target, error, match",
    [
        (torch.zeros(1, 2, 2, dtype=torch.int32), TypeError, "int64"),  # wrong dtype
        (torch.zeros(2, 2, dtype=torch.int64), ValueError, r"shape \(N, H, W\)"),  # no batch axis
        (torch.tensor([[[0, 1], [2, 0]]]), ValueError, r"outside \[0, 2\)"),  # class 2 of 2
        (torch.tensor([[[0, 1], [-1, 0]]]), ValueError, r"outside \[0, 2\)"),  # negative, not ignore_index
    ],
)
def test_bad_targets_are_refused(target: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        weighted_cross_entropy(torch.zeros(1, 2, 2, 2), target)


# ---- center_crop for targets, weights, numpy --------------------------------------------------------


@pytest.mark.parametrize(
    "shape, size, expected_slices",
    [
        ((5, 5), 3, (slice(1, 4), slice(1, 4))),  # 1 off each side
        ((6, 6), 3, (slice(1, 4), slice(1, 4))),  # odd difference: extra pixel off the bottom/right
        ((2, 6, 8), (2, 4), (slice(None), slice(2, 4), slice(2, 6))),  # (N, H, W) target
        ((4, 4), (4, 4), (slice(0, 4), slice(0, 4))),  # no-op
    ],
)
def test_center_crop_numpy_and_torch(shape: tuple, size, expected_slices: tuple) -> None:
    a = np.arange(np.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(center_crop(a, size), a[expected_slices])
    t = torch.from_numpy(a)
    assert torch.equal(center_crop(t, size), t[expected_slices])


@pytest.mark.parametrize("shape, size", [((4, 4), 5), ((4, 4), (0, 2)), ((4,), 2)])
def test_center_crop_refuses_impossible_sizes(shape: tuple, size) -> None:
    with pytest.raises(ValueError, match="center_crop"):
        center_crop(np.zeros(shape), size)


# ---- soft Dice ---------------------------------------------------------------------------------------


def confident(target: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    """Logits (N, C, H, W) that put ~all probability on ``target``."""
    return (F.one_hot(target, num_classes).permute(0, 3, 1, 2).float() * 2 - 1) * scale


def test_soft_dice_perfect_vs_wrong() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 6))
    perfect = soft_dice_loss(confident(target, 3), target).item()
    uniform = soft_dice_loss(torch.zeros(2, 3, 6, 6), target).item()
    wrong = soft_dice_loss(confident((target + 1) % 3, 3), target).item()
    assert perfect < 1e-6
    # p = 1/3 everywhere, class k on n_k pixels of n: dice_k ~ 2(n_k/3) / (n/3 + n_k) = 1/3 for n_k = n/3.
    assert uniform == pytest.approx(2 / 3, abs=0.05)
    assert wrong > 0.95  # dice_k = eps / (sum p + sum g + eps) ~ 1/49


def test_soft_dice_ignores_pixels_and_has_gradients() -> None:
    target = torch.tensor([[[0, 1], [1, -100]]])
    logits = confident(target.clamp(min=0), 2)
    logits[0, :, 1, 1] = torch.tensor([30.0, -30.0])  # wrong, but ignored
    assert soft_dice_loss(logits, target).item() < 1e-6
    logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
    soft_dice_loss(logits, target).backward()
    assert torch.count_nonzero(logits.grad[:, :, 1, 1]) == 0 and torch.count_nonzero(logits.grad) > 0


def test_soft_dice_without_background_is_the_foreground_term():
    from octseg.unet.losses import soft_dice_loss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 5, 6), torch.randint(0, 2, (2, 5, 6))
    p = torch.softmax(logits, 1)[:, 1]
    g = (target == 1).float()
    expected = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    assert soft_dice_loss(logits, target, include_background=False).item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_loss_adds_the_dice_term_only_when_weighted():
    from octseg.unet.losses import soft_dice_loss, weighted_cross_entropy
    from octseg.unet.train import training_loss

    torch.manual_seed(1)
    logits, target, w = torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 4, 4)), torch.rand(1, 4, 4) + 1
    ce = weighted_cross_entropy(logits, target, w)
    assert training_loss(logits, target, w, 0.0).item() == pytest.approx(ce.item())
    both = ce + 0.5 * soft_dice_loss(logits, target, include_background=False)
    assert training_loss(logits, target, w, 0.5).item() == pytest.approx(both.item())

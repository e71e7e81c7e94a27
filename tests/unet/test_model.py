"""Tests for unet.model / unet.parts / unet.config: the paper's network (arXiv 1505.04597) and its options."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from octseg.unet.config import UNetConfig
from octseg.unet.model import UNet, Unet, nearest_valid_input_size, output_size, valid_input_sizes
from octseg.unet.parts import center_crop


@pytest.fixture(scope="module")
def paper_net() -> UNet:
    """The default network, built once (31M parameters)."""
    torch.manual_seed(0)
    return UNet()


def tiny(**kwargs) -> UNet:
    """A small net for fast forward/backward tests."""
    torch.manual_seed(0)
    return UNet(**{"base_channels": 4, "depth": 2, **kwargs})


# ---- the paper's network ------------------------------------------------------------------------


def test_default_parameter_count_is_the_papers(paper_net: UNet) -> None:
    assert paper_net.num_parameters() == 31_030_658
    assert sum(p.numel() for p in paper_net.parameters()) == 31_030_658


def test_paper_counts_23_conv_layers(paper_net: UNet) -> None:
    # Paper, Sec. 2: "In total the network has 23 convolutional layers." That is
    # 18 3x3 convs (2 per level: 5 contracting incl. the bottleneck + 4 expanding)
    # + 4 2x2 up-convolutions (ConvTranspose2d) + 1 final 1x1 conv.
    convs3 = [m for m in paper_net.modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3)]
    ups = [m for m in paper_net.modules() if isinstance(m, nn.ConvTranspose2d)]
    convs1 = [m for m in paper_net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert (len(convs3), len(ups), len(convs1)) == (18, 4, 1)
    assert all(m.padding == (0, 0) for m in convs3)  # unpadded convolutions
    assert all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
    assert [m.out_channels for m in convs3[::2]] == [64, 128, 256, 512, 1024, 512, 256, 128, 64]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in paper_net.modules())


def test_paper_tile_572_gives_388(paper_net: UNet) -> None:
    x = torch.randn(1, 1, 572, 572)
    with torch.no_grad():
        y = paper_net(x)
    assert y.shape == (1, 2, 388, 388)
    assert torch.isfinite(y).all()


def test_he_init_std_and_zero_biases(paper_net: UNet) -> None:
    # Paper, Sec. 3: Gaussian with std sqrt(2/N), N = incoming nodes of one neuron (e.g. 9*64).
    for m in paper_net.modules():
        if isinstance(m, nn.ConvTranspose2d):
            fan_in = m.in_channels  # 2x2 stride-2 kernels do not overlap: one input pixel per channel
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            continue
        expected = math.sqrt(2.0 / fan_in)
        if m.weight.numel() >= 500:  # enough samples for a 10% tolerance
            assert m.weight.std().item() == pytest.approx(expected, rel=0.10)
        assert abs(m.weight.mean().item()) < 0.1 * expected
        assert torch.count_nonzero(m.bias) == 0


# ---- input/output sizes -----------------------------------------------------------------------

SIZE_CASES = [
    # (n, depth, padding, expected output)
    (572, 4, "valid", 388),  # the paper's tile (Fig. 1)
    (508, 4, "valid", 324),  # one step (16) below: 504/2-4=248 ... bottleneck 24 -> 324
    (188, 4, "valid", 4),  # smallest valid input for depth 4
    (68, 2, "valid", 28),  # 64/2=32 -> 28/2=14 -> 10 -> 20-4=16 -> 32-4=28
    (18, 1, "valid", 2),  # 14/2=7 -> 3 -> 6-4=2
    (64, 4, "same", 64),  # same padding keeps the size
    (20, 2, "same", 20),
]


@pytest.mark.parametrize("n, depth, padding, expected", SIZE_CASES)
def test_output_size_table(n: int, depth: int, padding: str, expected: int) -> None:
    assert output_size(n, depth, padding) == expected


@pytest.mark.parametrize("h, w", [(68, 68), (76, 68), (68, 84)])  # odd-sized levels differ per axis
def test_small_net_forward_matches_output_size(h: int, w: int) -> None:
    net = tiny()
    with torch.no_grad():
        y = net(torch.randn(2, 1, h, w))
    assert y.shape == (2, 2, net.output_size(h), net.output_size(w))
    assert (net.output_size(68), net.output_size(76), net.output_size(84)) == (28, 36, 44)


NEAREST_CASES = [
    # (n, depth, padding, (below, above))
    (572, 4, "valid", (572, 572)),  # valid: itself
    (500, 4, "valid", (492, 508)),  # 496/2=248 -> 244/2=122 -> 118/2=59 -> 55: odd at pool 4
    (1, 4, "valid", (None, 188)),  # nothing valid below
    (70, 2, "valid", (68, 72)),  # 66/2 = 33: odd; depth 2 repeats every 4
    (43, 2, "valid", (None, 44)),  # 44 = smallest depth-2 input: bottleneck 4 -> 4 -> 4
    (30, 3, "same", (24, 32)),  # same padding: multiples of 2**depth
]


@pytest.mark.parametrize("n, depth, padding, expected", NEAREST_CASES)
def test_nearest_valid_input_size(n: int, depth: int, padding: str, expected: tuple) -> None:
    assert nearest_valid_input_size(n, depth, padding) == expected


def test_valid_input_sizes_are_periodic() -> None:
    assert valid_input_sizes(1, 600) == list(range(188, 601, 16))
    assert valid_input_sizes(1, 50, depth=2, padding="same") == list(range(4, 51, 4))
    assert tiny().valid_input_sizes(60, 90) == list(range(60, 90, 4))


@pytest.mark.parametrize(
    "n, depth, padding, why, named",
    [
        (500, 4, "valid", "max-pool 4 would see an odd size", ["492 below", "508 above"]),
        (70, 2, "valid", "max-pool 2 would see an odd size", ["68 below", "72 above"]),
        (6, 2, "valid", "shrink to -3 before max-pool 2", ["none below", "44 above"]),  # 2/2=1, 1-4
        (18, 2, "same", "max-pool 2 would see an odd size", ["16 below", "20 above"]),  # 18/2 = 9
    ],
)
def test_invalid_size_names_nearest_valid_sizes(n: int, depth: int, padding: str, why: str, named: list) -> None:
    with pytest.raises(ValueError, match="nearest valid input sizes") as info:
        output_size(n, depth, padding)
    assert why in str(info.value)
    assert all(s in str(info.value) for s in named)


def test_size_functions_take_numpy_ints_but_not_floats() -> None:
    assert output_size(np.int64(572)) == 388
    with pytest.raises(TypeError, match="n must be an int, got float"):
        output_size(572.0)


def test_forward_raises_same_value_error_on_invalid_size() -> None:
    net = tiny()
    with pytest.raises(ValueError, match=r"input width: .*68 below, 72 above"):
        net(torch.zeros(1, 1, 68, 70))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\)"):
        net(torch.zeros(1, 3, 68, 68))
    with pytest.raises(ValueError, match=r"expected input of shape"):
        net(torch.zeros(1, 68, 68))


def test_same_padding_keeps_size() -> None:
    net = tiny(padding="same")
    with torch.no_grad():
        y = net(torch.randn(1, 1, 20, 36))
    assert y.shape == (1, 2, 20, 36)
    with pytest.raises(ValueError, match="16 below, 20 above"):
        net(torch.randn(1, 1, 18, 20))


# ---- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, n_bn, n_upconv",
    [
        ({}, 0, 2),  # paper
        ({"batch_norm": True}, 10, 2),  # 2 per DoubleConv: inc, 2 downs, 2 ups
        ({"up_mode": "bilinear"}, 0, 0),  # upsample + 1x1 conv instead of ConvTranspose2d
        ({"dropout": 0.5, "padding": "same", "batch_norm": True, "up_mode": "bilinear"}, 10, 0),
    ],
)
def test_options_build_and_run(kwargs: dict, n_bn: int, n_upconv: int) -> None:
    net = tiny(in_channels=3, out_channels=5, **kwargs)
    mods = list(net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == n_bn
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in mods) == n_upconv
    n = 68
    with torch.no_grad():
        y = net.eval()(torch.randn(2, 3, n, n))
    assert y.shape == (2, 5, net.output_size(n), net.output_size(n))
    assert torch.isfinite(y).all()


def test_dropout_acts_only_in_training() -> None:
    net = tiny(dropout=0.5)
    assert isinstance(net.dropout, nn.Dropout) and net.dropout.p == 0.5
    x = torch.randn(1, 1, 68, 68)
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("kwargs", [{}, {"batch_norm": True, "up_mode": "bilinear", "dropout": 0.2}])
def test_gradients_reach_every_parameter(kwargs: dict) -> None:
    net = tiny(**kwargs)
    torch.manual_seed(1)
    y = net(torch.randn(2, 1, 76, 68))
    loss = nn.functional.cross_entropy(y, torch.randint(0, 2, (2, *y.shape[2:])))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


# ---- seed-article alias and config -------------------------------------------------------------------


def test_seed_article_alias_builds_the_same_network(paper_net: UNet) -> None:
    alias = Unet(in_channel=1, out_channel=2)
    assert isinstance(alias, UNet)
    assert alias.config == paper_net.config
    assert alias.num_parameters() == paper_net.num_parameters()
    shapes = {k: tuple(v.shape) for k, v in alias.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in paper_net.state_dict().items()}
    assert [type(m) for m in alias.modules()] == [type(m) for m in paper_net.modules()]
    assert Unet(in_channel=3, out_channel=5, base_channels=4, depth=2).config == tiny(
        in_channels=3, out_channels=5
    ).config


def test_config_round_trip_rebuilds_identical_network() -> None:
    net = tiny(in_channels=2, out_channels=3, padding="same", batch_norm=True, dropout=0.5, up_mode="bilinear")
    saved = net.config.to_dict()
    rebuilt = UNet.from_config(UNetConfig.from_dict(saved))
    assert rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())  # strict: same keys and shapes
    x = torch.randn(1, 2, 20, 20)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net.eval()(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"padding": "reflect"}, ValueError, r"padding\n  Input should be 'valid' or 'same'"),
        ({"up_mode": "nearest"}, ValueError, r"up_mode\n  Input should be 'transpose' or 'bilinear'"),
        ({"depth": 0}, ValueError, r"depth\n  Input should be greater than or equal to 1"),
        ({"base_channels": 64.0}, ValueError, r"base_channels\n  Input should be a valid integer"),
        ({"in_channels": True}, ValueError, r"in_channels\n  Input should be a valid integer"),
        ({"dropout": 1.0}, ValueError, r"dropout\n  Input should be less than 1"),
        ({"batch_norm": 1}, ValueError, r"batch_norm\n  Input should be a valid boolean"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        UNetConfig(**kwargs)
    with pytest.raises(error, match=match):
        UNet(**kwargs)


def test_config_from_dict_rejects_unknown_keys() -> None:
    d = UNetConfig().to_dict() | {"n_classes": 3}
    with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['n_classes'\]"):
        UNetConfig.from_dict(d)
    assert UNetConfig.from_dict({"depth": 3}) == UNetConfig(depth=3)  # missing keys take defaults
    assert UNetConfig(dropout=0).dropout == 0.0 and isinstance(UNetConfig(dropout=0).dropout, float)


# ---- center_crop (the paper's "copy and crop") ------------------------------------------------------


def test_center_crop_feature_map() -> None:
    t = torch.arange(2 * 3 * 6 * 7).reshape(2, 3, 6, 7)
    c = center_crop(t, (2, 3))
    assert c.shape == (2, 3, 2, 3)
    assert torch.equal(c, t[:, :, 2:4, 2:5])
    # Paper: 64x64 skip cropped to 56x56 at the lowest level -> 4 pixels off each side.
    assert torch.equal(center_crop(torch.ones(1, 1, 64, 64), 56), torch.ones(1, 1, 56, 56))

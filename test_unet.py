"""Tests for unet.py: shapes, parameter counts against a closed-form count, initialisation,
timestep embedding against NumPy, per-sample independence, memory format and autocast."""

import math

import numpy as np
import pytest
import torch

from unet import PRESETS, ResBlock, UNet, build_unet, count_parameters, num_groups, timestep_embedding

TINY = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,), dropout=0.0, image_size=16)


def tiny(**overrides):
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def perturb_zero_params(model, std=0.1, seed=1):
    """Give every all-zero parameter (zero-initialised convs, biases) small random values,
    so the residual branches and the output are not identically zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def inputs(model, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    x = torch.randn(batch, model.in_channels, s, s, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ---------------------------------------------------------------------------
# closed-form parameter count, written from the architecture description (not from the module)


def conv(i, o, k):
    return i * o * k * k + o


def linear(i, o):
    return i * o + o


def gn(c):
    return 2 * c


def res_block(i, o, emb):
    return gn(i) + conv(i, o, 3) + linear(emb, o) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)


def attn_block(c):
    return gn(c) + conv(c, 3 * c, 1) + conv(c, c, 1)


def expected_params(in_channels=1, out_channels=None, base_channels=64, channel_mult=(1, 2, 2),
                    num_res_blocks=2, attn_resolutions=(14,), dropout=0.1, image_size=28):
    ch, emb = base_channels, 4 * base_channels
    out_channels = out_channels or in_channels
    n = linear(ch, emb) + linear(emb, emb) + conv(in_channels, ch, 3)
    skips, cur, res = [ch], ch, image_size
    for i, m in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            n += res_block(cur, ch * m, emb) + (attn_block(ch * m) if res in attn_resolutions else 0)
            cur = ch * m
            skips.append(cur)
        if i < len(channel_mult) - 1:
            n += conv(cur, cur, 3)  # downsample
            skips.append(cur)
            res //= 2
    n += 2 * res_block(cur, cur, emb) + attn_block(cur)
    for i, m in reversed(list(enumerate(channel_mult))):
        for _ in range(num_res_blocks + 1):
            n += res_block(cur + skips.pop(), ch * m, emb) + (attn_block(ch * m) if res in attn_resolutions else 0)
            cur = ch * m
        if i > 0:
            n += conv(cur, cur, 3)  # upsample conv
            res *= 2
    return n + gn(cur) + conv(cur, out_channels, 3)


@pytest.fixture(scope="module")
def cifar10():
    torch.manual_seed(0)
    return build_unet("cifar10").eval()


def test_cifar10_parameter_count(cifar10):
    assert count_parameters(cifar10) == 35_746_307
    assert expected_params(**PRESETS["cifar10"]) == 35_746_307


@pytest.mark.parametrize("config", [
    TINY,
    dict(TINY, num_res_blocks=2, attn_resolutions=(16, 8), out_channels=2),
    PRESETS["mnist"],
    PRESETS["mnist-small"],
    dict(PRESETS["mnist-small"], base_channels=48, attn_resolutions=(28, 14, 7)),
])
def test_parameter_count_matches_formula(config):
    model = UNet(**config)
    assert sum(p.numel() for p in model.parameters()) == expected_params(**config)


# ---------------------------------------------------------------------------
# shapes and configurations


def test_preset_output_shapes(cifar10):
    for name in ("mnist", "mnist-small"):
        model = build_unet(name).eval()
        x, t = inputs(model, batch=2)
        with torch.no_grad():
            assert model(x, t).shape == (2, 1, 28, 28)
    x, t = inputs(cifar10, batch=1)
    with torch.no_grad():
        assert cifar10(x, t).shape == (1, 3, 32, 32)


def test_learned_variance_doubles_output_channels():
    model = build_unet("mnist-small", out_channels=2)
    x, t = inputs(model)
    assert model(x, t).shape == (2, 2, 28, 28)


@pytest.mark.parametrize("overrides", [
    dict(num_res_blocks=1, attn_resolutions=(16, 8, 4), channel_mult=(1, 2, 2), image_size=16),
    dict(channel_mult=(1, 2, 2, 2), attn_resolutions=(16, 4), image_size=32, in_channels=3),
    dict(channel_mult=(1, 2, 2), attn_resolutions=(28, 14, 7), image_size=28),
    dict(channel_mult=(1,), attn_resolutions=(), image_size=12),
    dict(base_channels=24, channel_mult=(1, 2), image_size=16),  # 24 and 48 channels: fewer groups
])
def test_odd_configurations(overrides):
    model = tiny(**overrides)
    x, t = inputs(model, batch=2)
    s = model.image_size
    assert model(x, t).shape == (2, model.out_channels, s, s)


@pytest.mark.parametrize("channels, groups", [
    (128, 32), (256, 32), (384, 32), (192, 32),  # Ho et al.'s widths: 32 groups
    (64, 16), (32, 8), (16, 4), (48, 12), (40, 10), (8, 2), (3, 1),  # at least 4 channels a group
])
def test_group_count(channels, groups):
    assert num_groups(channels) == groups


# ---------------------------------------------------------------------------
# initialisation and training signal


def adam_steps(model, n, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, t = inputs(model, batch=4, seed=2)
    target = torch.randn_like(x)
    for _ in range(n):
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fresh_model_outputs_zero_until_trained():
    model = tiny()
    x, t = inputs(model)
    assert torch.equal(model(x, t), torch.zeros_like(x))
    adam_steps(model, 1)
    assert model(x, t).abs().max() > 0


def test_output_depends_on_t_after_training():
    model = tiny()
    adam_steps(model, 3)  # step 1 moves conv_out only; later steps reach the residual branches
    model.eval()
    x, _ = inputs(model, batch=1)
    x = x.expand(3, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 1, 999]))
    scale = out.abs().max()
    assert (out[0] - out[1]).abs().max() > 1e-3 * scale
    assert (out[0] - out[2]).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("base_channels", [16, 32, 48])
def test_every_res_block_sees_the_embedding(base_channels):
    """The shift added from the embedding must survive the GroupNorm that follows it
    (it would not with one channel per group)."""
    model = perturb_zero_params(tiny(base_channels=base_channels)).eval()
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    torch.manual_seed(3)
    emb = torch.randn(2, 4 * base_channels)
    for block in blocks:
        h = torch.randn(1, block.conv1.in_channels, 4, 4).expand(2, -1, -1, -1)
        with torch.no_grad():
            out = block(h, emb)
        assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()


def test_every_parameter_gets_a_gradient():
    model = perturb_zero_params(tiny(num_res_blocks=2, attn_resolutions=(16, 8)))
    x, t = inputs(model)
    (model(x, t) - torch.randn_like(x)).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().max() > 0, name


# ---------------------------------------------------------------------------
# timestep embedding


def test_timestep_embedding_matches_numpy():
    dim, t = 64, np.array([0, 1, 17, 500, 999])
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    want = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    got = timestep_embedding(torch.from_numpy(t), dim)
    assert got.shape == (5, dim) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    assert freqs[0] == 1.0 and math.isclose(freqs[-1], 1e-4)


# ---------------------------------------------------------------------------
# numerics: per-sample independence, memory format, autocast


def test_each_sample_is_processed_alone():
    model = perturb_zero_params(tiny()).double().eval()
    x, t = inputs(model, batch=2, dtype=torch.float64)
    with torch.no_grad():
        both = model(x, t)
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(2)])
    assert both.abs().max() > 0
    torch.testing.assert_close(both, alone, rtol=1e-12, atol=1e-12)


def test_channels_last_matches_contiguous():
    model = perturb_zero_params(tiny()).eval()
    x, t = inputs(model)
    with torch.no_grad():
        want = model(x, t)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_close_to_fp32():
    model = perturb_zero_params(tiny()).eval()
    x, t = inputs(model)
    with torch.no_grad():
        want = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, t)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).norm() / want.norm()
    assert err < 0.05, err


def test_bf16_weights_follow_bf16_inputs():
    model = perturb_zero_params(tiny()).bfloat16().eval()
    x, t = inputs(model)
    with torch.no_grad():
        assert model(x.bfloat16(), t).dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# validation


def one_line_value_error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_configuration_raises():
    msg = one_line_value_error(lambda: UNet(image_size=30, channel_mult=(1, 2, 2)))
    assert "30" in msg and "4" in msg
    one_line_value_error(lambda: UNet(image_size=28, attn_resolutions=(16,)))
    one_line_value_error(lambda: UNet(base_channels=7))
    msg = one_line_value_error(lambda: build_unet("imagenet"))
    assert all(name in msg for name in PRESETS)


@pytest.mark.parametrize("x_shape, t_shape", [
    ((2, 3, 16, 16), (2,)),   # wrong channels
    ((2, 1, 28, 28), (2,)),   # wrong size
    ((1, 16, 16), (1,)),      # not 4-D
    ((2, 1, 16, 16), (3,)),   # t batch mismatch
    ((2, 1, 16, 16), (2, 1)), # t not 1-D
])
def test_bad_inputs_raise(x_shape, t_shape):
    model = tiny()
    x, t = torch.zeros(x_shape), torch.zeros(t_shape, dtype=torch.long)
    msg = one_line_value_error(lambda: model(x, t))
    assert "got" in msg

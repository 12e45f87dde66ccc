"""Tests for unet.py: shapes, parameter counts against a closed-form count, initialisation,
timestep embedding against NumPy, per-sample independence, memory format and autocast; the
class-conditional network against diffusers and the space-to-depth stem against its definition."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unet import (PRESETS, AttnBlock, Downsample, ResBlock, UNet, Upsample, build_unet, count_parameters,
                  num_groups, timestep_embedding)

# Too narrow for Ho et al.'s 32 groups: the per-layer counts (num_groups(16) = 4, ...).
TINY = dict(in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,), dropout=0.0, image_size=16, norm_groups=None)


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
                    num_res_blocks=2, attn_resolutions=(14,), dropout=0.1, image_size=28,
                    num_classes=None, space_to_depth=1,
                    **norm_and_padding):  # group counts and padding change no parameter count
    """A class embedding is one row of emb numbers per label and the null label; the stem s
    multiplies conv_in's input and conv_out's output channels by s² and starts the levels at
    image_size / s."""
    ch, emb, s2 = base_channels, 4 * base_channels, space_to_depth ** 2
    out_channels = (out_channels or in_channels) * s2
    n = linear(ch, emb) + linear(emb, emb) + conv(in_channels * s2, ch, 3)
    n += (num_classes + 1) * emb if num_classes else 0
    skips, cur, res = [ch], ch, image_size // space_to_depth
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
    dict(PRESETS["mnist-tiny"], num_classes=10),
    dict(PRESETS["mnist-tiny"], space_to_depth=2, channel_mult=(1, 2), attn_resolutions=(14, 7)),
    dict(TINY, space_to_depth=4, channel_mult=(1,), attn_resolutions=(4,), out_channels=2,
         num_classes=3),
])
def test_parameter_count_matches_formula(config):
    model = UNet(**config)
    assert sum(p.numel() for p in model.parameters()) == expected_params(**config)


# ---------------------------------------------------------------------------
# shapes and configurations


def test_preset_output_shapes(cifar10):
    for name in ("mnist", "mnist-small", "mnist-tiny", "mnist-stem"):
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


# ---------------------------------------------------------------------------
# the blocks and the whole forward pass against formulas written here (float64, random weights)


def randomise(module, std=0.05, seed=0):
    """Overwrite every parameter (zero-initialised ones included) with N(0, std²) draws, plus 1 for
    GroupNorm scales (so that signals keep their size through the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                one = 1.0 if isinstance(m, torch.nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(one + torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def gn_ref(x, norm):
    """GroupNorm by hand: per sample and group of C/G channels, (x - mean)/sqrt(biased var + eps),
    then the per-channel affine of `norm`."""
    B, C = x.shape[:2]
    G = num_groups(C)
    xg = x.reshape(B, G, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    h = ((xg - mean) / torch.sqrt(var + 1e-6)).reshape(x.shape)
    return h * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def silu(x):
    return x * torch.sigmoid(x)


def conv_ref(x, conv, padding):
    return F.conv2d(x, conv.weight, conv.bias, padding=padding)


def res_ref(block, x, emb):
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + W_e silu(emb) + b_e))), dropout off."""
    h = conv_ref(silu(gn_ref(x, block.norm1)), block.conv1, 1)
    h = h + (silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias)[:, :, None, None]
    h = conv_ref(silu(gn_ref(h, block.norm2)), block.conv2, 1)
    skip = x if isinstance(block.shortcut, torch.nn.Identity) else conv_ref(x, block.shortcut, 0)
    return skip + h


def attn_ref(block, x):
    """x + proj(V softmax(Q^T K / sqrt(C))^T) over the H*W positions, with Q, K, V the first,
    second and third C channels of the 1x1 conv qkv(GroupNorm(x)); single head."""
    B, C, H, W = x.shape
    qkv = conv_ref(gn_ref(x, block.norm), block.qkv, 0).reshape(B, 3 * C, H * W)
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]             # [B, C, N] each
    logits = torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C)        # query i, key j
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    w = w / w.sum(-1, keepdim=True)
    h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
    return x + conv_ref(h, block.proj, 0)


def test_attn_block_is_scaled_dot_product_attention():
    """AttnBlock(x) = x + proj(softmax(QᵀK/√C) V) with Q, K, V the three C-channel slices (in that
    order) of qkv(GroupNorm(x)), over H*W = 12 positions (≠ C, so 1/√(HW) differs from 1/√C)."""
    block = randomise(AttnBlock(8), std=0.3, seed=1).double()
    x = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got, want = block(x), attn_ref(block, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - x).abs().max() > 0.1  # the attention branch is not negligible


@pytest.mark.parametrize("in_ch, out_ch, dropout", [(8, 8, 0.0), (8, 12, 0.5)])
def test_res_block_matches_formula(in_ch, out_ch, dropout):
    """ResBlock(x, emb) = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + Linear(silu(emb)))))
    with shortcut = identity (in = out) or a 1x1 conv (in ≠ out); dropout is the identity in eval."""
    block = randomise(ResBlock(in_ch, out_ch, 6, dropout), std=0.2, seed=3).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, in_ch, 4, 5, generator=g, dtype=torch.float64)
    emb = torch.randn(2, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got, want = block(x, emb), res_ref(block, x, emb)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert isinstance(block.shortcut, torch.nn.Identity) == (in_ch == out_ch)


@pytest.mark.parametrize("size", [6, 5])
def test_downsample_is_stride_2_conv_padded_by_one(size):
    """Downsample(x) = 3x3 conv with stride 2 of x zero-padded by one on every side:
    [.., s, s] -> [.., ceil(s/2), ceil(s/2)]."""
    down = randomise(Downsample(4, padding="symmetric"), std=0.2, seed=5).double()
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = F.conv2d(F.pad(x, (1, 1, 1, 1)), down.conv.weight, down.conv.bias, stride=2)
    with torch.no_grad():
        got = down(x)
    assert got.shape == (2, 4, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_upsample_is_nearest_x2_then_conv():
    """Upsample(x) = 3x3 conv (padding 1) of x with every pixel repeated into a 2x2 block."""
    up = randomise(Upsample(4), std=0.2, seed=7).double()
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    want = F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1)
    with torch.no_grad():
        got = up(x)
    assert got.shape == (2, 4, 6, 10)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# The network unet_ref writes out: per-layer group counts (gn_ref) and symmetric padding.
SKIPS = dict(in_channels=2, out_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=2,
             attn_resolutions=(8, 4), dropout=0.0, image_size=8, norm_groups=None,
             downsample_padding="symmetric")


def space_to_depth_ref(x, s):
    """[B, C, H, W] -> [B, s²C, H/s, W/s]: channel c s² + i s + j holds x[:, c, i::s, j::s], the
    pixels at offset (i, j) of every s x s block (PyTorch's documented pixel_unshuffle)."""
    C = x.shape[1]
    return torch.stack([x[:, c, i::s, j::s] for c in range(C) for i in range(s) for j in range(s)], 1)


def depth_to_space_ref(h, s):
    """The inverse: [B, s²C, H, W] -> [B, C, sH, sW], written by assignment."""
    B, C, H, W = h.shape[0], h.shape[1] // s ** 2, h.shape[2], h.shape[3]
    out = h.new_zeros(B, C, s * H, s * W)
    for c in range(C):
        for i in range(s):
            for j in range(s):
                out[:, c, i::s, j::s] = h[:, c * s * s + i * s + j]
    return out


def time_emb_ref(model, t):
    """Linear(SiLU(Linear([sin(t f_i) | cos(t f_i)]))) with f_i = 10000^(-i/(half-1))."""
    half = model.base_channels // 2
    freqs = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs
    emb = torch.cat([torch.sin(args), torch.cos(args)], 1)
    lin1, lin2 = model.emb[0], model.emb[2]
    return silu(emb @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias


def unet_ref(model, x, t, drop_skip=None, y=None):
    """Ho et al.'s U-Net written out from the model's layers: sinusoidal embedding -> Linear, SiLU,
    Linear, plus the class embedding's row y (the null row for y None) when the model has one;
    space-to-depth of x when the model has the stem; conv_in; down levels push conv_in's output,
    every (res block -> attention) output and every downsample's output as skips; mid
    res/attn/res; each up res block takes cat([h, last skip pushed]) on channels; GroupNorm, SiLU,
    conv_out, depth-to-space back. drop_skip=k zeroes the k-th skip consumed on the way up."""
    emb = time_emb_ref(model, t)
    if model.class_emb is not None:  # row y of the table; its last row, the null label, for None
        table = model.class_emb.weight
        emb = emb + (table[y] if y is not None else table[-1])
    stem = model.space_to_depth
    x = space_to_depth_ref(x, stem) if stem > 1 else x

    def attn(a, h):
        return h if isinstance(a, torch.nn.Identity) else attn_ref(a, h)

    h = conv_ref(x, model.conv_in, 1)
    skips = [h]
    for level in model.down:
        for block, a in zip(level.blocks, level.attns):
            h = attn(a, res_ref(block, h, emb))
            skips.append(h)
        if level.resample is not None:
            h = F.conv2d(F.pad(h, (1, 1, 1, 1)), level.resample.conv.weight, level.resample.conv.bias, stride=2)
            skips.append(h)
    h = res_ref(model.mid2, attn_ref(model.mid_attn, res_ref(model.mid1, h, emb)), emb)
    used = 0
    for level in model.up:
        for block, a in zip(level.blocks, level.attns):
            s = skips.pop()
            if used == drop_skip:
                s = torch.zeros_like(s)
            used += 1
            h = attn(a, res_ref(block, torch.cat([h, s], 1), emb))
        if level.resample is not None:
            up = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = conv_ref(up, level.resample.conv, 1)
    assert not skips and used == sum(len(level.blocks) for level in model.up)
    out = conv_ref(silu(gn_ref(h, model.norm_out)), model.conv_out, 1)
    return depth_to_space_ref(out, stem) if stem > 1 else out


def test_unet_forward_matches_reference_with_every_skip():
    """UNet.forward equals the U-Net written out here, in float64 with random weights everywhere
    (attention at both resolutions); and every one of the 6 skips matters: zeroing any one of them
    in the reference moves the output away from the model's."""
    model = randomise(UNet(**SKIPS), std=0.05, seed=9).double().eval()
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        got = model(x, t)
        want = unet_ref(model, x, t)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        scale = want.abs().max()
        assert scale > 0
        for k in range(6):
            dropped = unet_ref(model, x, t, drop_skip=k)
            assert (dropped - got).abs().max() > 0.05 * scale, k


def test_timestep_embedding_float64_frequencies_and_halves():
    """In float64, timestep_embedding(t, dim) = [sin(t f_i) | cos(t f_i)] with f_i = 10000^(-i/(dim/2-1))
    to rounding: f_0 = 1 and f_{dim/2-1} = 1e-4 exactly at the two ends, sin in the first half
    (all 0 at t = 0) and cos in the second (all 1 at t = 0)."""
    dim, half = 16, 8
    t = torch.tensor([0, 1, 10000, 999])
    got = timestep_embedding(t, dim, torch.float64)
    assert got.shape == (4, dim) and got.dtype == torch.float64
    f = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=torch.float64)
    want = torch.cat([torch.sin(t.double()[:, None] * f), torch.cos(t.double()[:, None] * f)], 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0], torch.cat([torch.zeros(half), torch.ones(half)]).double())
    # t = 1: the raw frequencies; f_0 = 1, f_last = 1e-4
    torch.testing.assert_close(got[1, 0], torch.tensor(math.sin(1.0), dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(got[1, half - 1], torch.tensor(math.sin(1e-4), dtype=torch.float64),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1, half], torch.tensor(math.cos(1.0), dtype=torch.float64), rtol=1e-15, atol=0)
    # t = 10000: the lowest frequency gives an argument of exactly 1
    torch.testing.assert_close(got[2, half - 1], torch.tensor(math.sin(1.0), dtype=torch.float64),
                               rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# the options diffusers and Ho et al.'s code need: TF-"SAME" downsampling, one group count


@pytest.mark.parametrize("size", [8, 28, 32])
def test_tf_same_downsample_pads_bottom_and_right_only(size):
    """TensorFlow's "SAME" for a stride-2 3x3 conv on an even size: total padding
    (ceil(s/2) - 1) * 2 + 3 - s = 1, all of it after the input (bottom, right); built here with
    an explicit F.pad and a padding-free conv, and different from the symmetric form."""
    torch.manual_seed(0)
    down = Downsample(4, padding="tf_same").double()
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    total = (math.ceil(size / 2) - 1) * 2 + 3 - size
    assert total == 1
    ref = F.conv2d(F.pad(x, (0, total, 0, total)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref, rtol=0, atol=1e-12)
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert (down(x) - symmetric).abs().max() > 1e-3


def test_one_group_count_everywhere_or_per_layer():
    """norm_groups=G puts G groups in every GroupNorm (ResBlocks, attention, the output norm); None
    (or 0, --norm-groups 0) keeps num_groups(channels) layer by layer, as checkpoints written
    before the option use."""
    uniform = UNet(**{**TINY, "norm_groups": 4})
    norms = [m for m in uniform.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    for per_layer in (UNet(**{**TINY, "norm_groups": None}), UNet(**{**TINY, "norm_groups": 0})):
        counts = [(m.num_groups, num_groups(m.num_channels)) for m in per_layer.modules()
                  if isinstance(m, torch.nn.GroupNorm)]
        assert len({n for n, _ in counts}) > 1 and all(n == want for n, want in counts)
    with pytest.raises(ValueError, match="norm_groups 5 does not divide"):
        UNet(**{**TINY, "norm_groups": 5})


def downsamplings(model):
    return [m for m in model.modules() if isinstance(m, Downsample)]


def test_the_defaults_are_ho_et_al_s_network():
    """Left out, the options build Ho et al.'s network: 32 groups in every GroupNorm (diffusers'
    norm_num_groups default too) and TensorFlow-"SAME" downsampling; the old network (per-layer
    groups, symmetric padding) is asked for by name, as checkpoint.upgrade does for format 1."""
    model = UNet()  # 64 and 128 channels (skip sums 128 to 256): all divisible by 32
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    assert downsamplings(model) and all(d.tf_same and d.conv.padding == (0, 0)
                                        for d in downsamplings(model))
    old = UNet(**{**TINY, "norm_groups": None, "downsample_padding": "symmetric"})
    assert downsamplings(old) and all(not d.tf_same and d.conv.padding == (1, 1)
                                      for d in downsamplings(old))
    for name in PRESETS:
        assert PRESETS[name]["downsample_padding"] == "tf_same" and PRESETS[name]["norm_groups"]


# ---------------------------------------------------------------------------
# class conditioning for classifier-free guidance (Ho & Salimans 2022)


def emb_seen_by_blocks(model, x, t, y=None):
    """The embedding the res blocks are given (captured where mid1 is called)."""
    seen = []
    handle = model.mid1.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        handle.remove()
    return seen[0]


def test_class_embedding_is_added_to_the_time_embedding():
    """emb = MLP(sinusoid(t)) + E[y], E of K + 1 rows; y=None picks row K, the null label; float64,
    random weights, the MLP written out here."""
    model = randomise(UNet(**TINY, num_classes=3), std=0.3, seed=11).double().eval()
    E = model.class_emb.weight
    assert model.null_label == 3 and E.shape == (4, 4 * TINY["base_channels"])
    x, _ = inputs(model, batch=4, dtype=torch.float64)
    t, y = torch.tensor([0, 5, 5, 999]), torch.tensor([0, 1, 3, 2])
    time_part = time_emb_ref(model, t)
    torch.testing.assert_close(emb_seen_by_blocks(model, x, t, y), time_part + E[y], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(emb_seen_by_blocks(model, x, t), time_part + E[3], rtol=1e-12, atol=1e-12)
    assert (E[1] - E[3]).abs().max() > 0.1  # so the two comparisons above tell labels apart


def test_conditional_forward_matches_reference_and_labels_matter():
    """The conditional network (with the stem too) equals the U-Net written out here, in float64;
    y=None is y = null_label everywhere, bit for bit; another label moves the output."""
    for stem, size in ((1, 8), (2, 16)):
        model = UNet(**{**SKIPS, "image_size": size, "space_to_depth": stem, "num_classes": 5})
        model = randomise(model, std=0.05, seed=13).double().eval()
        g = torch.Generator().manual_seed(14)
        x = torch.randn(2, 2, size, size, generator=g, dtype=torch.float64)
        t, y = torch.tensor([3, 871]), torch.tensor([4, 0])
        with torch.no_grad():
            got = model(x, t, y)
            torch.testing.assert_close(got, unet_ref(model, x, t, y=y), rtol=1e-10, atol=1e-12)
            assert torch.equal(model(x, t), model(x, t, torch.full((2,), model.null_label)))
            moved = model(x, t, torch.tensor([1, 2]))
        assert (moved - got).abs().max() > 0.01 * got.abs().max()


def test_a_fresh_conditional_network_is_the_unconditional_one():
    """From one seed, the conditional network's other parameters equal the unconditional one's bit
    for bit and the global generator ends in the same state (the class embedding draws nothing
    and comes last in the state dict); its zero rows make every label compute the unconditional
    output."""
    torch.manual_seed(5)
    plain = UNet(**TINY)
    plain_rng = torch.get_rng_state()
    torch.manual_seed(5)
    cond = UNet(**TINY, num_classes=10)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    a, b = plain.state_dict(), cond.state_dict()
    assert list(b) == list(a) + ["class_emb.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert b["class_emb.weight"].shape == (11, 64) and not b["class_emb.weight"].any()
    perturb_zero_params(plain).eval()
    cond.load_state_dict(plain.state_dict(), strict=False)  # class_emb stays zero
    x, t = inputs(plain, batch=3)
    with torch.no_grad():
        want = plain(x, t)
        assert want.abs().max() > 0
        for y in (None, torch.tensor([0, 9, 10])):
            assert torch.equal(cond.eval()(x, t, y), want)


def test_every_label_row_gets_a_gradient():
    """A batch holding every label, the null one included, moves every row of the embedding."""
    model = perturb_zero_params(tiny(num_classes=3))
    x, t = inputs(model, batch=4)
    y = torch.tensor([0, 1, 2, 3])
    (model(x, t, y) - torch.randn_like(x)).pow(2).mean().backward()
    assert (model.class_emb.weight.grad.abs().amax(1) > 0).all()


def test_bad_labels_raise_one_line():
    model = tiny(num_classes=3)
    x, t = inputs(model, batch=2)
    for y in (torch.tensor([0, 4]), torch.tensor([-1, 2])):
        assert "0..3" in one_line_value_error(lambda: model(x, t, y))
    for y in (torch.tensor([[0], [1]]), torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0]),
              torch.tensor([0, 1], dtype=torch.int32)):
        assert "[B] = [2]" in one_line_value_error(lambda: model(x, t, y))
    assert "unconditional" in one_line_value_error(lambda: tiny()(x, t, torch.tensor([0, 1])))
    for bad in (0, -2, 2.5):
        assert "num_classes" in one_line_value_error(lambda: UNet(**TINY, num_classes=bad))


def diffusers_sinusoid_in_float64(timesteps, embedding_dim, flip_sin_to_cos=False,
                                  downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers' get_timestep_embedding formula, computed in float64 (diffusers computes it in
    float32), so that the two networks can be compared at 1e-9."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = timesteps[:, None].double() * torch.exp(exponent)[None, :] * scale
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


def test_conditional_network_is_diffusers_with_class_embeddings(monkeypatch):
    """Our conditional network computes what diffusers' UNet2DModel with num_class_embeds = K + 1
    computes with class_labels (its class embedding added after the time MLP), in float64 to
    1e-9, with our weights copied in: interop's names for the rest, class_embedding.weight here."""
    pytest.importorskip("diffusers", reason="pip install -r requirements-test.txt")
    import diffusers.models.embeddings as diffusers_embeddings
    from diffusers import UNet2DModel
    import interop

    kwargs = dict(TINY, image_size=8, attn_resolutions=(4,), norm_groups=4, norm_eps=1e-6,
                  downsample_padding="tf_same", out_channels=2)
    ours = randomise(UNet(**kwargs, num_classes=3), std=0.05, seed=15).double().eval()
    config = {k: v for k, v in interop.diffusers_unet_config(kwargs).items() if not k.startswith("_")}
    theirs = UNet2DModel(**{**config, "num_class_embeds": 4}).double().eval()
    state = dict(ours.state_dict())
    weights = {**interop.weights_to_diffusers({k: v for k, v in state.items() if k != "class_emb.weight"}),
               "class_embedding.weight": state["class_emb.weight"]}
    theirs.load_state_dict(weights)  # strict: every parameter placed, none left over
    monkeypatch.setattr(diffusers_embeddings, "get_timestep_embedding", diffusers_sinusoid_in_float64)
    g = torch.Generator().manual_seed(16)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([0, 17, 500, 999]), torch.tensor([3, 0, 1, 2])
    with torch.no_grad():
        mine, want = ours(x, t, y), theirs(x, t, class_labels=y).sample
        other = theirs(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample
    scale = want.abs().max()
    assert ((mine - want).abs().max() / scale).item() < 1e-9
    assert (other - want).abs().max() > 1e-3 * scale  # the labels matter in diffusers' model too


# ---------------------------------------------------------------------------
# the space-to-depth stem (Hoogeboom et al. 2023, "simple diffusion", Sec. 3)

STEM = dict(SKIPS, image_size=16, space_to_depth=2)  # levels at 8 and 4, attention at both


def test_pixel_unshuffle_is_space_to_depth():
    """The references written here are PyTorch's pixel_unshuffle and pixel_shuffle, and invert
    each other."""
    x = torch.randn(2, 3, 6, 12, generator=torch.Generator().manual_seed(17))
    for s in (2, 3):
        packed = space_to_depth_ref(x, s)
        assert packed.shape == (2, 3 * s * s, 6 // s, 12 // s)
        assert torch.equal(F.pixel_unshuffle(x, s), packed)
        assert torch.equal(F.pixel_shuffle(packed, s), x) and torch.equal(depth_to_space_ref(packed, s), x)


def test_stem_network_matches_reference():
    """With space_to_depth=2, conv_in is given pixel_unshuffle(x) ([B, 4C, H/2, W/2]), attention runs
    at the levels' resolutions 8 and 4 of a 16x16 input, and the whole network equals the U-Net
    written out here with depth-to-space after conv_out (out_channels 3 ≠ in_channels 2, so the
    grouping of output channels is checked too), in float64."""
    model = randomise(UNet(**STEM), std=0.05, seed=18).double().eval()
    g = torch.Generator().manual_seed(19)
    x = torch.randn(2, 2, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 871])
    seen, sizes = [], set()
    model.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    for m in model.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_pre_hook(lambda m, args: sizes.add(args[0].shape[-1]))
    with torch.no_grad():
        got = model(x, t)
    assert got.shape == (2, 3, 16, 16)
    assert torch.equal(seen[0], space_to_depth_ref(x, 2)) and sizes == {8, 4}
    with torch.no_grad():
        torch.testing.assert_close(got, unet_ref(model, x, t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_channels, out_channels", [(1, None), (1, 2), (3, 6)])
def test_stem_output_has_the_input_size_and_a_zero_head(in_channels, out_channels):
    """Output [B, C_out, H, W] for C_out = C and 2C (learned variance); conv_out starts at zero, so
    a fresh network outputs zeros."""
    model = UNet(in_channels=in_channels, out_channels=out_channels, base_channels=16,
                 channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(7,), dropout=0.0,
                 image_size=28, norm_groups=4, space_to_depth=2)
    assert model.conv_in.in_channels == 4 * in_channels
    assert not model.conv_out.weight.any() and not model.conv_out.bias.any()
    x, t = inputs(model, batch=2)
    out = model(x, t)
    assert out.shape == (2, out_channels or in_channels, 28, 28) and not out.any()


def test_stem_configuration_errors():
    """The stem and the levels must halve image_size evenly; s >= 1; attention resolutions are the
    levels' (28 is not one with the stem)."""
    msg = one_line_value_error(lambda: UNet(image_size=28, channel_mult=(1, 2, 2), space_to_depth=2))
    assert "28" in msg and "8" in msg and "space_to_depth" in msg
    one_line_value_error(lambda: UNet(image_size=28, channel_mult=(1, 2), space_to_depth=3,
                                      attn_resolutions=()))
    for bad in (0, -1, 1.5):
        assert "space_to_depth" in one_line_value_error(lambda: UNet(space_to_depth=bad))
    msg = one_line_value_error(lambda: UNet(image_size=28, channel_mult=(1, 2), space_to_depth=2,
                                            attn_resolutions=(28,)))
    assert "[14, 7]" in msg
    UNet(**{**PRESETS["mnist-tiny"], "space_to_depth": 2, "channel_mult": (1, 2),
            "attn_resolutions": (14, 7)})


def test_stem_channels_last_and_bf16_autocast_with_labels():
    model = perturb_zero_params(tiny(space_to_depth=2, attn_resolutions=(4,), num_classes=3)).eval()
    x, t = inputs(model)
    y = torch.tensor([1, 3])
    with torch.no_grad():
        want = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
        last = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y)
    assert low.dtype == torch.bfloat16 and (low.float() - want).norm() / want.norm() < 0.05
    torch.testing.assert_close(last, want, rtol=1e-4, atol=1e-5)


def forward_flops(model):
    """Matmul and convolution FLOPs of one forward pass at batch 1 (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t = inputs(model, batch=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def test_stem_costs_under_six_tenths_of_the_flops():
    """mnist-tiny at 28/14/7 against the same width with the stem and two levels at 14/7: the
    levels at H/2 cost a quarter per pixel, so the stem network's forward FLOPs are below 0.6x
    the plain one's; its parameter count stays of the same order (between half and all)."""
    plain = build_unet("mnist-tiny")
    for base in (24, 32):
        stem = build_unet("mnist-tiny", space_to_depth=2, channel_mult=(1, 2), base_channels=base,
                          norm_groups=base // 4)
        assert forward_flops(stem) < 0.6 * forward_flops(plain), base
    assert 0.5 * count_parameters(plain) < count_parameters(build_unet(
        "mnist-tiny", space_to_depth=2, channel_mult=(1, 2))) < count_parameters(plain)

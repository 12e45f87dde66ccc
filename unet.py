"""The network of Ho et al. 2020 (Appendix B): a U-Net with residual blocks,
self-attention at chosen resolutions and a sinusoidal timestep embedding.

Its output is whatever the diffusion trains it to predict (ddpm.py's mean_type: ε as in Ho et
al., x_0, or v); with out_channels = 2 * in_channels the second half is the variance
interpolation vector of Nichol & Dhariwal 2021. It imports nothing from the
project and decides no device or dtype: it follows its inputs.

Shapes: x is [B, C, H, W]; t is [B] of 0-based timestep indices (the array index
into the schedule tables, as in Ho et al.'s code); y, for a class-conditional network, is [B] of
labels; the output is [B, out_channels, H, W].

Three options, off by default: class conditioning for classifier-free guidance (num_classes), a
space-to-depth stem (space_to_depth) and self-conditioning on an estimate of x_0 (self_cond); see
UNet.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GN_EPS = 1e-6  # Ho et al.'s group norm epsilon


# ---------------------------------------------------------------------------
# building blocks


def timestep_embedding(t, dim, dtype=torch.float32):
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020 App. B).

    Frequencies f_i = exp(-log(10000) * i / (dim/2 - 1)), i = 0..dim/2-1, as in Ho et al.'s code.
    t: [B] (any numeric dtype) -> [B, dim] of `dtype` (float32 or float64), [sin(t f) | cos(t f)].
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000.0) / (half - 1)))
    args = t.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def num_groups(channels, max_groups=32, min_group_size=4):
    """GroupNorm group count: the largest divisor of `channels` that is <= 32 and leaves
    at least 4 channels per group (1 group if none does).

    32 for Ho et al.'s widths (>= 128). The floor on the group size matters in narrow models:
    with one channel per group the norm after the timestep projection subtracts each
    channel's mean, which removes the per-channel shift added from the embedding, so the
    block would ignore t.
    """
    cap = min(max_groups, channels // min_group_size)
    return max([g for g in range(1, cap + 1) if channels % g == 0], default=1)


def group_norm(channels, groups=None, eps=GN_EPS):
    """GroupNorm over `channels`: `groups` groups (one count for every layer, as in Ho et al.'s code
    and diffusers' norm_num_groups), or None for num_groups(channels) layer by layer."""
    groups = groups or num_groups(channels)
    if channels % groups:
        raise ValueError(f"norm_groups {groups} does not divide a layer's {channels} channels; "
                         "choose a norm_groups that divides every width (and the skip sums)")
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_(module):
    """Zero a layer's weight and bias in place (Ho et al.'s init_scale=0); returns the layer."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """Residual block with a timestep projection added after the first conv.

    x: [B, in_ch, H, W], emb: [B, emb_dim] -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch, out_ch, emb_dim, dropout, norm=group_norm):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    softmax(Q K^T / sqrt(C)) V, Q, K, V from one 1x1 conv. x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels, norm=group_norm):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2)  # [B, 3, HW, C]
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C], scale 1/sqrt(C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


DOWNSAMPLE_PADDINGS = ("symmetric", "tf_same")


class Downsample(nn.Module):
    """Stride-2 3x3 conv. [B, C, H, W] -> [B, C, H/2, W/2] for even H, W.

    padding "tf_same": TensorFlow's "SAME" padding, as in Ho et al.'s code (and diffusers'
    downsample_padding=0): for even sizes the one row and column of zeros go at the bottom and
    right only. "symmetric": one row and column of zeros on every side (PyTorch's padding=1, and
    diffusers' default downsample_padding=1), the form this project's checkpoints written before
    the option existed use.
    """

    def __init__(self, channels, padding):
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"unknown downsample_padding {padding!r}; use "
                             f"{' or '.join(DOWNSAMPLE_PADDINGS)}")
        self.tf_same = padding == "tf_same"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.tf_same else 1)

    def forward(self, x):
        if self.tf_same:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U-Net: res blocks (each followed by attention or identity),
    then an optional resampling layer (None at the coarsest level going down / finest going up)."""

    def __init__(self, blocks, attns, resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


# ---------------------------------------------------------------------------
# the U-Net


class UNet(nn.Module):
    """Ho et al. 2020's U-Net, e.g. ε_θ(x_t, t), or ε_θ(x_t, t, y) with num_classes.
    forward: x [B, C, H, W], t [B] int (, y [B] int) -> [B, out_channels, H, W].

    num_classes = K (None: unconditional) adds a learned class embedding of K + 1 rows, row K
    the "null" label (no class) of classifier-free guidance (Ho & Salimans 2022): emb =
    MLP(sinusoid(t)) + class_emb(y), where diffusers' UNet2DModel adds its class embedding
    (num_class_embeds = K + 1). Its rows start at zero (not nn.Embedding's N(0, 1), which would
    outweigh the time MLP's output at init): a fresh conditional network computes what the
    unconditional one of the same seed computes, every label starts as the null label, and
    training moves each row by the gradient of the samples that carry it.

    space_to_depth = s > 1 (Hoogeboom et al. 2023, "simple diffusion", Sec. 3) rearranges the
    input by pixel_unshuffle into [B, s²C, H/s, W/s] before conv_in and the output back by
    pixel_shuffle: the levels run at H/s, H/(2s), ... (the resolutions attn_resolutions name),
    image_size stays the input's. diffusers' UNet2DModel has no such stem: a network with one is
    not expressible as a UNet2DModel and has no diffusers export.

    self_cond = True (Chen, Zhang & Hinton 2023, "Analog Bits", §3) gives the network a second
    input, an estimate x̂_0 of the clean image (forward's pred_x0; zeros when absent),
    concatenated to x_t on channels: conv_in takes [x_t, x̂_0], 2C channels (2s²C after the
    stem, where pixel_unshuffle of the concatenation is the concatenation of each one's, so
    the stem needs nothing of its own). Training feeds x̂_0 = 0 or the network's own detached
    estimate (optim.py); the samplers feed the previous step's (ddpm.self_conditioned).
    UNet2DModel has no such input either: no diffusers export."""

    def __init__(self, in_channels=1, out_channels=None, base_channels=64, channel_mult=(1, 2, 2),
                 num_res_blocks=2, attn_resolutions=(14,), dropout=0.1, image_size=28,
                 norm_groups=32, norm_eps=GN_EPS, downsample_padding="tf_same",
                 num_classes=None, space_to_depth=1, self_cond=False):
        """norm_groups: GroupNorm groups in every layer (Ho et al.'s 32, diffusers'
        norm_num_groups; it must divide every width and skip sum, so a narrow network names its
        own), or None (or 0, train.py's --norm-groups 0) for num_groups(channels) layer by layer,
        as checkpoints written before the option existed have it (not exportable to diffusers).
        downsample_padding: "tf_same" (Ho et al.'s) or "symmetric" (see Downsample).
        num_classes: K class labels plus the null label K, or None; space_to_depth: the stem's
        factor s (1: no stem); self_cond: x̂_0 as a second input (False: none)."""
        super().__init__()
        _check_config(base_channels, channel_mult, num_res_blocks, attn_resolutions, image_size,
                      num_classes, space_to_depth, self_cond)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.image_size = image_size
        self.space_to_depth = space_to_depth
        self.self_cond = self_cond
        self.null_label = num_classes  # the label trained as "no class"; None: unconditional
        ch, emb_dim, s2 = base_channels, 4 * base_channels, space_to_depth ** 2

        def norm(channels):
            return group_norm(channels, norm_groups, norm_eps)

        def res_block(cin, cout):
            return ResBlock(cin, cout, emb_dim, dropout, norm)

        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        inputs = 2 * in_channels if self_cond else in_channels  # [x_t, x̂_0] or x_t
        self.conv_in = nn.Conv2d(s2 * inputs, ch, 3, padding=1)

        def attn(c, res):
            return AttnBlock(c, norm) if res in attn_resolutions else nn.Identity()

        # down path: remember the channel count of every activation pushed as a skip
        skips, cur, res = [ch], ch, image_size // space_to_depth
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res_block(cur, ch * mult))
                cur = ch * mult
                attns.append(attn(cur, res))
                skips.append(cur)
            last = i == len(channel_mult) - 1
            self.down.append(Level(blocks, attns,
                                   None if last else Downsample(cur, downsample_padding)))
            if not last:
                skips.append(cur)
                res //= 2

        self.mid1 = res_block(cur, cur)
        self.mid_attn = AttnBlock(cur, norm)
        self.mid2 = res_block(cur, cur)

        # up path: each res block eats one skip, concatenated on channels
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(cur + skips.pop(), ch * mult))
                cur = ch * mult
                attns.append(attn(cur, res))
            self.up.append(Level(blocks, attns, Upsample(cur) if i != 0 else None))
            if i != 0:
                res *= 2

        self.norm_out = norm(cur)
        self.conv_out = nn.Conv2d(cur, s2 * self.out_channels, 3, padding=1)
        self._init_weights()
        # zeros, drawn from no generator: the other layers' initialisation is the same with it
        self.class_emb = None if num_classes is None else nn.Embedding.from_pretrained(
            torch.zeros(num_classes + 1, emb_dim), freeze=False)

    def _init_weights(self):
        """Ho et al.'s init: fan-avg uniform (Xavier) weights, zero biases; residual-branch
        output convs, attention projections and conv_out start at zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero_(m.conv2)
            elif isinstance(m, AttnBlock):
                zero_(m.proj)
        zero_(self.conv_out)

    def forward(self, x, t, y=None, pred_x0=None):
        """x: [B, in_channels, image_size, image_size] float, t: [B] 0-based timestep indices,
        y: [B] class labels in 0..K (K = null_label: no class), or None: all null (an
        unconditional network takes no y), pred_x0: x̂_0 shaped as x for a self_cond network,
        or None: zeros (a network without self_cond takes none)
        -> [B, out_channels, image_size, image_size]."""
        self._check_inputs(x, t, y, pred_x0)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        emb = self.emb(timestep_embedding(t, self.base_channels, dtype).to(x.dtype))  # [B, 4ch]
        if self.class_emb is not None:
            y = torch.full_like(t, self.null_label, dtype=torch.long) if y is None else y
            emb = emb + self.class_emb(y).to(emb.dtype)  # emb's dtype: bf16 under autocast

        if self.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if pred_x0 is None else pred_x0.to(x.dtype)], 1)
        s = self.space_to_depth
        h = self.conv_in(F.pixel_unshuffle(x, s) if s > 1 else x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, s) if s > 1 else out

    def _check_inputs(self, x, t, y, pred_x0=None):
        """Shape checks (no host-device sync); y's range only where y is on the CPU, since
        reading it from an accelerator would sync every call (labels from a dataset or a
        command line are checked where they enter)."""
        want = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be [B, {want[0]}, {want[1]}, {want[2]}], got {list(x.shape)}")
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got {list(t.shape)}")
        if y is not None:
            self._check_labels(y, x.shape[0])
        if pred_x0 is not None:
            if not self.self_cond:
                raise ValueError("pred_x0 given to a network without self-conditioning "
                                 "(self_cond=False); build it with self_cond=True to feed x̂_0")
            if pred_x0.shape != x.shape:
                raise ValueError(f"pred_x0 must be shaped as x, {list(x.shape)}, got "
                                 f"{list(pred_x0.shape)}")

    def _check_labels(self, y, batch):
        """y: a LongTensor [batch] of labels in 0..K, given to a conditional network only."""
        K = self.null_label
        if K is None:
            raise ValueError("y given to an unconditional network (num_classes=None); "
                             "build it with num_classes to condition on a class")
        if tuple(y.shape) != (batch,) or y.dtype != torch.long:
            raise ValueError(f"y must be a LongTensor [B] = [{batch}], got {y.dtype} {list(y.shape)}")
        if y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) <= K:
            raise ValueError(f"y must hold labels in 0..{K} ({K}: no class), "
                             f"got {int(y.min())}..{int(y.max())}")


def _check_config(base_channels, channel_mult, num_res_blocks, attn_resolutions, image_size,
                  num_classes=None, space_to_depth=1, self_cond=False):
    """Raise ValueError (one line) on a configuration the U-Net cannot build."""
    if len(channel_mult) == 0 or num_res_blocks < 1:
        raise ValueError(f"need at least one level and one res block, got channel_mult={channel_mult}, "
                         f"num_res_blocks={num_res_blocks}")
    if base_channels < 4 or base_channels % 2:
        raise ValueError(f"base_channels must be even and >= 4 (timestep embedding), got {base_channels}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if not isinstance(space_to_depth, int) or space_to_depth < 1:
        raise ValueError(f"space_to_depth must be an int >= 1 (1: no stem), got {space_to_depth!r}")
    if not isinstance(self_cond, bool):
        raise ValueError(f"self_cond must be True or False, got {self_cond!r}")
    factor = space_to_depth * 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by space_to_depth * "
                         f"2**(len(channel_mult)-1) = {factor}; use a multiple of {factor}, "
                         "fewer channel_mult levels or a smaller space_to_depth")
    resolutions = [image_size // space_to_depth // 2 ** i for i in range(len(channel_mult))]
    unused = [r for r in attn_resolutions if r not in resolutions]
    if unused:
        raise ValueError(f"attn_resolutions {unused} never reached; resolutions are {resolutions}")


# ---------------------------------------------------------------------------
# presets

# Every preset uses one GroupNorm group count throughout (so diffusers' UNet2DModel expresses it)
# and TensorFlow-"SAME" downsampling (as Ho et al.'s code).
PRESETS = {
    # 28x28 MNIST on a GPU
    "mnist": dict(in_channels=1, base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(14,), dropout=0.1, image_size=28, norm_groups=16,
                  downsample_padding="tf_same"),
    # 28x28 MNIST in minutes on a small CPU
    "mnist-small": dict(in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(7,), dropout=0.0, image_size=28, norm_groups=8,
                        downsample_padding="tf_same"),
    # 28x28 MNIST in minutes on a 2-core CPU (the CPU default before mnist-stem): mnist-small at
    # three quarters of its width, 1.6x its steps per second there; the README's table compares them
    "mnist-tiny": dict(in_channels=1, base_channels=24, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attn_resolutions=(7,), dropout=0.0, image_size=28, norm_groups=6,
                       downsample_padding="tf_same"),
    # 28x28 MNIST within the README's minutes on a CPU (the CPU default): a 2x2 space-to-depth
    # stem (Hoogeboom et al. 2023, Sec. 3) so the levels run at 14 and 7, widths multiples of 16;
    # 0.10 GFLOP per image against mnist-tiny's 0.21 (docs/results.md). Not a UNet2DModel: no export
    "mnist-stem": dict(in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(7,), dropout=0.0, image_size=28, norm_groups=8,
                       downsample_padding="tf_same", space_to_depth=2),
    # Ho et al. 2020's CIFAR-10 network exactly (35.7M parameters)
    "cifar10": dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1, image_size=32, norm_groups=32,
                    downsample_padding="tf_same"),
    # 64x64: improved-diffusion's levels, widths and blocks for ImageNet 64 (Nichol & Dhariwal
    # 2021), in Ho et al.'s blocks (one attention head, no scale-shift norm)
    "imagenet64": dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4),
                       num_res_blocks=3, attn_resolutions=(16, 8), dropout=0.0, image_size=64,
                       norm_groups=32, downsample_padding="tf_same"),
    # 256x256: Ho et al.'s LSUN and CelebA-HQ network (google/ddpm-celebahq-256)
    "celebahq256": dict(in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                        num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, image_size=256,
                        norm_groups=32, downsample_padding="tf_same"),
}


def build_unet(preset, **overrides):
    """UNet from a named preset in PRESETS, with any constructor kwargs overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    return UNet(**{**PRESETS[preset], **overrides})


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The run's configuration, in one shape: Config holds `net` (the kwargs of unet.UNet), `diffusion`
(the kwargs of ddpm.GaussianDiffusion, beside the schedule's name and T) and `train` (data,
optimiser, budget, outputs), and the checkpoint stores it as it is:

    UNet(**cfg.net)
    GaussianDiffusion(make_beta_schedule(cfg.schedule, cfg.timesteps), **cfg.diffusion)

The flags are flat (Flags, with Ho et al.'s defaults); each one's metadata says which part it
fills. settle() makes every automatic choice (machine, recipe, network fitted to the images) once,
before anything is built; a resumed run takes net, diffusion and data from its checkpoint.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

import ddpm
import hardware
import sampling
import unet
import userdata
from cli import MAX_COUNT, ArgumentParser, UserError, check, check_number

CPU_MINUTES = 17.0  # no --steps or --preset on a CPU: a run sized to this wall time
GPU_STEPS = 30000


# The parts a flag fills: "net" and "diffusion" are the constructors' kwargs, "process" the
# schedule and T beside them, "data" what the model learns from and in what order, "train" the rest.
# A resumed run keeps its checkpoint's net, process, diffusion and data.
KEPT_ON_RESUME = ("net", "process", "diffusion", "data")


def _flag(part, default, help, choices=None, auto=None, key=None):
    """A flag with its --help text, the part of the Config it fills (under `key`, default its own
    name) and, with `auto`, what a default of None means."""
    return field(default=default, metadata={"help": help, "part": part, "choices": choices,
                                            "auto": auto, "key": key})


@dataclass
class Flags:
    """Every flag of train.py; defaults follow Ho et al. 2020 (App. B) where it gives one."""
    dataset: str = _flag(
        "data", "mnist", "mnist, fashion-mnist, cifar10, npz:PATH (a uint8 array N x H x "
        "W or N x H x W x C of your own, with its labels in an array named "
        "labels, if any) or folder:DIR (every image under DIR)")
    data_dir: str = _flag(
        "train", None, "local copies of the dataset files", auto="$DDPM_DATA, then the "
        "cache $DDPM_CACHE or ~/.cache/ddpm, then the network")
    image_size: int = _flag(
        "data", None, userdata.HELP["image_size"][0], auto=userdata.HELP["image_size"][1])
    channels: int = _flag("data", None, userdata.HELP["channels"][0], choices=(1, 3),
                          auto=userdata.HELP["channels"][1])
    labels: str = _flag("data", None, userdata.HELP["labels"][0], choices=userdata.LABEL_MODES,
                        auto=userdata.HELP["labels"][1])
    val_fraction: float = _flag("data", None, userdata.HELP["val_fraction"][0],
                                auto=userdata.HELP["val_fraction"][1])
    class_cond: bool = _flag(
        "data", None, "a class-conditional model (classifier-free guidance, Ho & "
        "Salimans 2022): the label is a learned embedding added to the time "
        "embedding, replaced by the null label with probability --cond-drop; "
        "needs labelled data (--no-class-cond: an unconditional model)",
        auto="the recipe's: on with cpu when the data has labels, off with ho")
    cond_drop: float = _flag(
        "data", 0.1, "--class-cond: the probability that a training image's label is "
        "replaced by the null label, so that one network learns the "
        "conditional and the unconditional model")
    hflip: bool = _flag(
        "data", None, "flip each training image left-right with probability 1/2 (Ho et "
        "al. App. B), a function of the seed, the step and its place in the batch",
        auto="on for cifar10 and folder: datasets, off for the others")
    preset: str = _flag(
        "data", None, "the network (a preset's size fitted to the images' side: levels "
        "down to 4-8 pixels)", choices=tuple(unet.PRESETS),
        auto="mnist-stem on a CPU; on a GPU mnist at 28x28, else the network of "
        "Ho et al. (or improved-diffusion) for the nearest of 32, 64, 256")
    base_channels: int = _flag("net", None, "channels at the first level", auto="the preset's")
    channel_mult: tuple = _flag("net", None, "channel multiplier of each level (space-separated)",
                                auto="the preset's")
    num_res_blocks: int = _flag("net", None, "residual blocks per level", auto="the preset's")
    attn_resolutions: tuple = _flag(
        "net", None, "resolutions with self-attention (space-separated)",
        auto="the preset's")
    dropout: float = _flag("net", None, "dropout in the residual blocks", auto="the preset's")
    norm_groups: int = _flag(
        "net", None, "GroupNorm groups in every layer (must divide every width); 0: "
        "per layer, the most groups <= 32 of >= 4 channels (not exportable "
        "to diffusers)", auto="the preset's")
    space_to_depth: int = _flag(
        "net", None, "a space-to-depth stem (Hoogeboom et al. 2023): 2 folds each "
        "2x2 block of pixels into channels before the first level and "
        "back after the last, so every level runs at half the side (not "
        "exportable to diffusers); 1: none", auto="the preset's")
    self_cond: bool = _flag(
        "net", None, "self-conditioning (Chen et al. 2023, Analog Bits, Sec. 3): the network also "
        "takes an estimate of x_0: in training its own, from an extra pass without gradient, "
        "for a random half of each batch and zeros for the rest; in sampling the previous "
        "step's (not exportable to diffusers)", auto="off")
    downsample_padding: str = _flag(
        "net", None, "tf_same: Ho et al.'s (zeros at the bottom and right); "
        "symmetric: zeros on every side", auto="the preset's",
        choices=unet.DOWNSAMPLE_PADDINGS)
    steps: int = _flag(
        "train", None, "training steps", auto="as many as fit in --minutes on a CPU without "
        f"--preset, else {GPU_STEPS}")
    minutes: float = _flag(
        "train", None, "size the run to this many minutes of wall time in all: the "
        "step count is chosen from the throughput measured in the first "
        "seconds, printed and stored in the checkpoint (give it as --steps to "
        "repeat the run exactly)", auto=f"{CPU_MINUTES} on a CPU without "
        "--steps or --preset, else off")
    recipe: str = _flag(
        "train", "auto", "the defaults of the training settings marked 'the recipe's' "
        "(each flag still overrides): ho, Ho et al. 2020's; cpu, tuned for a "
        "good model within --minutes on a CPU (docs/results.md); auto: cpu on a "
        "CPU, ho elsewhere", choices=("auto", "ho", "cpu"))
    batch_size: int = _flag(
        "data", None, "global batch size (split over the processes under torchrun)",
        auto="the recipe's")
    lr: float = _flag("train", None, "peak Adam learning rate", auto="the recipe's")
    warmup: int = _flag("train", None, "steps of linear learning-rate warmup", auto="the recipe's")
    grad_clip: float = _flag("train", 1.0, "clip the gradient's global norm to this")
    lr_schedule: str = _flag(
        "train", None, "after the warmup: constant (Ho et al.); decay to 0 at the "
        "last step along a cosine or a line; or wsd (warmup-stable-decay): "
        "constant, then a line to 0 over the last --decay-fraction of the "
        "steps (a --minutes run fixes its step count when the decay begins, "
        "from its own steps' rate)",
        choices=("constant", "cosine", "linear", "wsd"), auto="the recipe's")
    decay_fraction: float = _flag(
        "train", 0.2, "wsd: the share of the steps, at the end, over which the "
        "learning rate decays to 0")
    ema_decay: float = _flag("train", None, "EMA decay, warmed up as min(decay, (1 + step) / "
                             "(--ema-warmup + step))", auto="the recipe's")
    ema_warmup: float = _flag(
        "train", None, "the EMA warmup's constant (larger: the average forgets the "
        "early weights more slowly)", auto="the recipe's")
    ema_snapshots: int = _flag(
        "train", 0, "every N steps and at the last, store two power-function EMAs of the weights "
        "(sigma_rel 0.05 and 0.10, Karras et al. 2024) in <out>/ema/, from which sample.py and "
        "evaluate.py --ema-length reconstruct an EMA of any length after training; the weights, "
        "the EMA and every draw are those of the run without it (0: off)")
    schedule: str = _flag(
        "process", None, "beta schedule", choices=("linear", "cosine"), auto="the recipe's")
    timesteps: int = _flag("process", 1000, "diffusion steps T")
    loss_type: str = _flag(
        "diffusion", "simple", "simple: L_simple (Ho Eq. 14); vlb: the bound; hybrid: "
        "L_simple + L_vlb/1000 (needs --var-type learned_range)",
        choices=ddpm.LOSS_TYPES)
    mean_type: str = _flag("diffusion", None, "what the network predicts: eps, x0 or v",
                           choices=ddpm.MEAN_TYPES, auto="the recipe's")
    loss_weighting: str = _flag(
        "diffusion", None, "weight of L_simple's squared error over t: none, min_snr "
        "(Hang et al. 2023: min(SNR, --snr-gamma) in x_0's terms) or p2 "
        "(Choi et al. 2022: 1/(--p2-k + SNR)^--p2-gamma in eps's terms)",
        choices=ddpm.LOSS_WEIGHTINGS, auto="the recipe's")
    snr_gamma: float = _flag("diffusion", 5.0, "Min-SNR's gamma")
    t_sampling: str = _flag("diffusion", None, "how training draws t: uniform (Ho et al.), or "
                            "lognormal (Karras "
                            "et al. 2022: ln sigma ~ N(-1.2, 1.2^2)) or logitnormal (Esser et al. "
                            "2024: ln sigma ~ N(0, 1)), each with 10%% of the draws uniform and "
                            "the loss weighted by (1/T)/P(t), so the objective stays the same",
                            choices=tuple(ddpm.TIMESTEP_SAMPLINGS), auto="the recipe's",
                            key="timestep_sampling")
    t_mean: float = _flag("diffusion", None, "--t-sampling lognormal or logitnormal: the mean of "
                          "ln sigma", auto="the option's paper value, -1.2 or 0")
    t_std: float = _flag("diffusion", None, "--t-sampling lognormal or logitnormal: the standard "
                         "deviation of ln sigma", auto="the option's paper value, 1.2 or 1")
    t_floor: float = _flag("diffusion", ddpm.TIMESTEP_FLOOR, "--t-sampling lognormal or "
                           "logitnormal: the share of the draws kept uniform over all T steps "
                           "(the loss weight stays <= 1/t_floor)")
    p2_k: float = _flag("diffusion", 1.0, "P2's k")
    p2_gamma: float = _flag("diffusion", 1.0, "P2's gamma (0: no weighting)")
    var_type: str = _flag(
        "diffusion", "fixed_large", "reverse-process variance: fixed_large (beta_t, Ho's "
        "CIFAR-10 sampler), fixed_small (posterior beta~_t) or learned_range",
        choices=ddpm.VAR_TYPES)
    precision: str = _flag(
        "train", "auto", hardware.PRECISION_HELP, choices=("auto",) + hardware.PRECISIONS)
    compile: bool = _flag("train", False, "torch.compile the network")
    channels_last: bool = _flag(
        "train", None, "channels_last memory layout", auto="on for CUDA, off on "
        "the CPU")
    seed: int = _flag("data", 0, "seed of the initial weights, the data order, t and the noise")
    out: str = _flag("train", None, "run directory", auto="runs/<dataset>")
    device: str = _flag("train", "auto", hardware.DEVICE_HELP)
    log_every: int = _flag("train", 50, "steps between lines of log.jsonl")
    sample_every: int = _flag("train", 1000, "steps between sample grids")
    ckpt_every: int = _flag("train", 1000, "steps between checkpoints")
    num_samples: int = _flag("train", 64, "images in each sample grid")
    eval_every: int = _flag(
        "train", 0, "steps between scores of the EMA model (0: off): --eval-samples "
        "DDIM samples scored by the evaluation classifier (confident, FD, "
        "entropy, precision, recall) into log.jsonl; 28x28 labelled data, or any dataset "
        "with --fid")
    eval_samples: int = _flag("train", 500, "samples per score of --eval-every")
    fid: bool = _flag(
        "train", False, "score --eval-every by FID instead, on any dataset: Inception features "
        "of the samples against as many training images' (evaluate.py --fid; FID at "
        "--eval-samples is higher than at the 50,000 papers use)")
    sampler: str = _flag(
        "train", sampling.DEFAULT_SAMPLER, "sampler of the grids: ddim (--sample-steps "
        "steps, --sample-eta) or ddpm (Ho's Algorithm 2, all T steps)",
        choices=sampling.SAMPLERS)
    sample_steps: int = _flag(
        "train", sampling.DEFAULT_STEPS, "DDIM steps of the sample grids and scores")
    sample_eta: float = _flag(
        "train", sampling.DEFAULT_ETA, "DDIM eta of the grids and scores: 1 is "
        "Algorithm 2 on the --sample-steps chain, 0 the deterministic DDIM "
        "(docs/results.md, the sampler table)")


# Flags about the invocation, not the run: they are not stored in its checkpoint.
INVOCATION = {
    "resume": "continue the run in --out from its checkpoint",
    "overwrite": "start a new run in an --out that holds one, deleting its checkpoint, log, "
                 "grids and eval.json (without it such an --out is refused)",
}


# Each recipe fills the fields a run leaves unset ("auto: the recipe's" in --help).
RECIPES = {
    # Ho et al. 2020, App. B: Adam at 2e-4 after 5,000 warmup steps, batch 128, EMA 0.9999, ε, the
    # linear schedule, L_simple unweighted.
    "ho": dict(batch_size=128, lr=2e-4, warmup=5000, lr_schedule="constant", ema_decay=0.9999,
               ema_warmup=10.0, schedule="linear", mean_type="eps", loss_weighting="none",
               t_sampling="uniform", class_cond=False),
    # A good model in --minutes on a CPU: docs/results.md says what each difference bought.
    "cpu": dict(batch_size=64, lr=4e-3, warmup=100, lr_schedule="wsd", ema_decay=0.9999,
                ema_warmup=10.0, schedule="cosine", mean_type="eps", loss_weighting="min_snr",
                t_sampling="logitnormal", class_cond=True),
}


FLAGS = dataclasses.fields(Flags)
NAMES = {part: tuple(f.name for f in FLAGS if f.metadata["part"] == part)
         for part in ("net", "process", "diffusion", "data", "train")}
# The training part: the flags of "data" and "train", with their defaults.
Train = dataclasses.make_dataclass("Train", [
    (f.name, f.type, field(default=f.default, metadata=f.metadata))
    for f in FLAGS if f.metadata["part"] in ("data", "train")])


@dataclass
class Config:
    """A run's configuration, stored in its checkpoint as it is (dataclasses.asdict)."""
    net: dict                    # unet.UNet(**net)
    diffusion: dict              # ddpm.GaussianDiffusion(betas, **diffusion)
    schedule: str                # the beta schedule's name (ddpm.make_beta_schedule) ...
    timesteps: int               # ... and its T
    train: Train                 # data, optimiser, budget, outputs
    class_names: Optional[list] = None  # the data's classes in label order, or None
    class_counts: Optional[list] = None  # training images of each class (None: not known, as
    #                                      for an imported model; the samplers then draw classes
    #                                      uniformly)


# ---- configuration --------------------------------------------------------------------------

def parse_args(argv=None, description=None):
    """{Flags field or INVOCATION flag: value} for the flags given (see --help)."""
    p = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    for f in FLAGS:
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        default = meta["auto"] or f.default
        text = f"{meta['help']} (default: {default})"
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif f.type is tuple:
            p.add_argument(flag, type=int, nargs="+", help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type.__name__, str)
            p.add_argument(flag, type=kind, choices=meta["choices"], help=text)
    for name, text in INVOCATION.items():
        p.add_argument("--" + name, action="store_true", help=text)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}


def split_invocation(given):
    """({Flags field: value}, {INVOCATION flag: bool}) of the flags given."""
    invocation = {k: bool(given.get(k, False)) for k in INVOCATION}
    check(not (invocation["resume"] and invocation["overwrite"]), "--resume continues the run in "
          "--out and --overwrite replaces it; give one of them")
    return {k: v for k, v in given.items() if k not in INVOCATION}, invocation


def default_out(dataset):
    """runs/<dataset>, with the ':' and '/' of npz:PATH and folder:DIR made safe for a directory
    name."""
    return os.path.join("runs", dataset.replace(":", "_").replace("/", "_").strip("_"))


def settle(flags, device, image_shape, num_classes=None, saved=None):
    """(Config, its GaussianDiffusion) for the flags (already checked by validate), the device,
    the images' (C, H, W) and their number of classes (None without labels): every automatic
    choice made here, once. A resumed run (`saved`: its checkpoint's config) keeps the
    checkpoint's net, diffusion and data and takes the rest from the flags. UserError for
    anything that cannot run, before any model work."""
    cfg = automatic(flags, device, image_shape, num_classes) if saved is None else \
        resumed(flags, saved)
    refuse_idle_flags(cfg.train, flags)
    # T is the checkpoint's when resuming: the flags' check could not know it
    check_number("--sample-steps", cfg.train.sample_steps, 1, cfg.timesteps)
    try:  # the diffusion, and the network without memory: their own checks, now
        diffusion = build_diffusion(dataclasses.asdict(cfg))
        with torch.device("meta"):
            unet.UNet(**cfg.net)
    except ValueError as e:
        raise UserError(f"{flag_words(str(e))}; change the flags") from None
    return cfg, diffusion


def refuse_idle_flags(opts, flags):
    """UserError for a flag given that this run would ignore (and store, so that --resume would
    then refuse to change it): --cond-drop without --class-cond, --decay-fraction with a learning
    rate schedule other than wsd."""
    check("cond_drop" not in flags or opts.class_cond, "--cond-drop is the label dropout of a "
          "class-conditional run, and this one is not; add --class-cond or drop --cond-drop")
    check("decay_fraction" not in flags or opts.lr_schedule == "wsd", "--decay-fraction is the "
          f"decay of --lr-schedule wsd, and this run's schedule is {opts.lr_schedule}; add "
          "--lr-schedule wsd or drop --decay-fraction")


def check_classes_unchanged(saved, names, dataset):
    """UserError when a class-conditional run (its checkpoint's config `saved`) is resumed on data
    whose classes (`names`, in label order; None without labels) are not the ones it was trained
    with: a class added, removed or renamed moves the labels under the network's embeddings and
    onto its null label. A run saved before class names were kept is compared by count."""
    if not saved["train"].get("class_cond"):
        return
    trained = saved.get("class_names")
    count = len(trained) if trained else saved["net"].get("num_classes")
    same = names is not None and (names == list(trained) if trained else len(names) == count)
    shown = lambda n: ", ".join(n[:8]) + (", ..." if len(n) > 8 else "")
    now = f"{len(names)} ({shown(names)})" if names else "no labels"
    check(same, f"--resume: {dataset} now has {now}, and the run was trained on {count} classes"
          f"{f' ({shown(list(trained))})' if trained else ''}; the classes of a class-conditional "
          "run cannot change: restore the data as it was, or start a new --out")


def build_diffusion(config):
    """GaussianDiffusion(betas, **config["diffusion"]) for a config dict (Config as saved), the
    betas from its "schedule" and "timesteps" (schedule "custom": the table under "betas", as
    imported models have it); ValueError for what ddpm.py refuses."""
    if config["schedule"] == "custom":
        betas = torch.tensor(config["betas"], dtype=torch.float64)
        if betas.shape != (config["timesteps"],):
            raise ValueError(f"{len(betas)} betas for T = {config['timesteps']}")
    else:
        betas = ddpm.make_beta_schedule(config["schedule"], config["timesteps"])
    return ddpm.GaussianDiffusion(betas, **config["diffusion"])


def flag_words(message):
    """A GaussianDiffusion error in the flags' words (its arguments named as --flags)."""
    for name in NAMES["diffusion"]:
        key = dict(FLAG_OF[name].metadata)["key"] or name
        message = re.sub(rf"\b{key}\b", "--" + name.replace("_", "-"), message)
    return message


FLAG_OF = {f.name: f for f in FLAGS}


def saved_value(saved, name):
    """The value a flag had in a checkpoint's config (an argument it leaves out: the
    constructor's default)."""
    part, key = FLAG_OF[name].metadata["part"], FLAG_OF[name].metadata["key"] or name
    if part in ("net", "diffusion"):
        made = unet.UNet if part == "net" else ddpm.GaussianDiffusion
        return saved[part].get(key, inspect.signature(made).parameters[key].default)
    return saved[key] if part == "process" else saved["train"][key]


def resumed(flags, saved):
    """The Config of a resumed run: its checkpoint's, with the flags of the training part."""
    kept = [name for part in KEPT_ON_RESUME for name in NAMES[part]]
    changed = [k for k in kept if k in flags and flags[k] != saved_value(saved, k)]
    check(not changed, f"--resume cannot change {', '.join(changed)} (the checkpoint has "
          f"{', '.join(f'{k}={saved_value(saved, k)}' for k in changed)}); start a new --out")
    train = Train(**{**saved["train"], **{k: v for k, v in flags.items() if k not in kept}})
    return Config(dict(saved["net"]), dict(saved["diffusion"]), saved["schedule"],
                  saved["timesteps"], train, saved.get("class_names"),
                  saved.get("class_counts"))


def automatic(flags, device, image_shape, num_classes):
    """The Config of a new run: the choices left to the machine and the dataset (see each flag's
    help), made on the flags before they are split into their parts."""
    cpu = device.type == "cpu"
    C, H, W = image_shape
    f = {**{fl.name: fl.default for fl in FLAGS}, **flags}
    f["preset"] = f["preset"] or default_preset(H, cpu)
    f["recipe"] = f["recipe"] if f["recipe"] != "auto" else ("cpu" if cpu else "ho")
    for key, value in RECIPES[f["recipe"]].items():
        if f[key] is None:
            f[key] = value
    if f["steps"] is None and f["minutes"] is None:
        if cpu and "preset" not in flags:
            f["minutes"] = CPU_MINUTES   # the step count is chosen once the model is built
        else:
            f["steps"] = GPU_STEPS
    if f["channels_last"] is None:
        f["channels_last"] = hardware.channels_last_default(device)
    f["precision"] = hardware.resolve_precision(f["precision"], device)
    f["out"] = f["out"] or default_out(f["dataset"])
    folder = f["dataset"].startswith("folder:")
    if f["hflip"] is None:
        f["hflip"] = folder or f["dataset"] == "cifar10"
    if folder:  # how the folder is read, stored so that --resume and evaluate.py read it so (an
        f["labels"] = f["labels"] or "none"  # image size or channels left out stay automatic)
        if f["val_fraction"] is None:
            f["val_fraction"] = userdata.VAL_FRACTION
    check(H == W, f"images must be square, got {H}x{W}")
    net = dict(unet.PRESETS[f["preset"]])
    resized = H != net["image_size"]
    if resized and "channel_mult" not in flags:
        stem = f["space_to_depth"] or net.get("space_to_depth", 1)
        net.update(fit_levels(net, H, stem))
    net.update({k: f[k] for k in NAMES["net"] if f[k] is not None})
    if resized and "channel_mult" in flags and "attn_resolutions" not in flags:
        net["attn_resolutions"] = (H // 2 ** (len(net["channel_mult"]) - 1),)  # the coarsest
    net.update(in_channels=C, image_size=H)
    net["out_channels"] = 2 * C if f["var_type"] == "learned_range" else C
    if f["class_cond"] and not num_classes and "class_cond" not in flags:
        f["class_cond"] = False  # the cpu recipe trains with labels where the data has them
    if f["class_cond"]:
        check(num_classes, f"--class-cond needs labels, and {f['dataset']} has none; labels come "
              "with mnist, fashion-mnist and cifar10, a folder's subfolders (--labels "
              "subfolders) or an npz file's labels array")
        net["num_classes"] = num_classes
    diffusion = {FLAG_OF[k].metadata["key"] or k: f[k] for k in NAMES["diffusion"]}
    train = Train(**{k: f[k] for k in NAMES["data"] + NAMES["train"]})
    return Config(net, diffusion, f["schedule"], f["timesteps"], train)


MAX_MINUTES = 1_000_000  # about two years


# Ho et al.'s networks by the resolution they were given for (App. B), and improved-diffusion's
# for 64x64: a GPU run on images of another size gets the nearest one, fitted (fit_levels).
SIZED_PRESETS = ("cifar10", "imagenet64", "celebahq256")
COARSEST = (4, 8)  # the side, in pixels, of a fitted network's coarsest level


def default_preset(size, cpu):
    """The network a run gets when --preset is left out: on a CPU mnist-stem (at any size, fitted
    by fit_levels); on a GPU mnist at 28x28, else Ho et al.'s network for the nearest resolution
    (on a log scale). The one place that picks a network for the machine and the images."""
    if cpu:
        return "mnist-stem"
    if size == 28:
        return "mnist"
    sizes = {p: unet.PRESETS[p]["image_size"] for p in SIZED_PRESETS}  # a tie: the larger one's
    return min(SIZED_PRESETS, key=lambda p: (abs(math.log(size / sizes[p])), -sizes[p]))


def fit_levels(kwargs, size, stem=1):
    """{"channel_mult", "attn_resolutions"} of a network fitted to size x size images, whose levels
    start at size / stem (a space-to-depth stem): as few levels as bring the coarsest to COARSEST
    (4-8 pixels), the multipliers cut or their last repeated; attention at the same levels,
    counted from the top (the coarsest where a level is gone). UserError naming --image-size for
    a size that no number of halvings brings there."""
    low, high = COARSEST
    fits_at = lambda s, n: s % (stem * 2 ** n) == 0 and low <= s // stem // 2 ** n <= high
    levels = next((n + 1 for n in range(11) if fits_at(size, n)), None)
    if levels is None:
        fits = [s for s in range(max(size - 16, 4), size + 17) if any(fits_at(s, n) for n in range(11))]
        nearest = sorted(fits, key=lambda s: (abs(s - size), s))[:2]
        raise UserError(f"{size}x{size} images cannot be halved down to {low}-{high} pixels for "
                        f"the network's coarsest level; give --image-size "
                        f"{' or '.join(map(str, sorted(nearest)))} (folder: datasets), resize "
                        "the images, or give --channel-mult")
    mult = tuple(kwargs["channel_mult"])
    mult = mult[:levels] + mult[-1:] * (levels - len(mult))
    top = kwargs["image_size"] // kwargs.get("space_to_depth", 1)
    old = [top // 2 ** i for i in range(len(kwargs["channel_mult"]))]
    attn = {min(old.index(r), levels - 1) for r in kwargs["attn_resolutions"] if r in old}
    return {"channel_mult": mult,
            "attn_resolutions": tuple(size // stem // 2 ** i for i in sorted(attn))}


def validate(flags, resuming=False):
    """UserError for the first flag that cannot run, before any data is read: every number finite
    and in its range (one table, checked by cli.check_number) and the combinations. The
    diffusion's options are checked by GaussianDiffusion itself (settle)."""
    check(not ("steps" in flags and "minutes" in flags and not resuming),
          "--steps fixes the run's length and --minutes sizes it to a time; give one of them")
    inf = None
    ranges = [  # (flag, low, high, open at the low end, open at the high end)
        ("steps", 1, MAX_COUNT), ("minutes", 0, MAX_MINUTES, True), ("batch_size", 1, MAX_COUNT),
        ("lr", 0, inf, True), ("warmup", 0, MAX_COUNT), ("grad_clip", 0, inf, True),
        ("ema_decay", 0, 1, False, True), ("ema_warmup", 1, inf), ("timesteps", 1, 100_000),
        ("seed", 0, MAX_COUNT), ("log_every", 1, MAX_COUNT), ("sample_every", 1, MAX_COUNT),
        ("ckpt_every", 1, MAX_COUNT), ("ema_snapshots", 0, MAX_COUNT), ("num_samples", 1, 100_000),
        ("eval_every", 0, MAX_COUNT),
        ("eval_samples", 4, 1_000_000), ("sample_eta", 0, inf),
        ("sample_steps", 1, flags.get("timesteps", Flags.timesteps)),
        ("dropout", 0, 1, False, True), ("norm_groups", 0, 4096), ("base_channels", 1, 65536),
        ("image_size", 1, 4096), ("val_fraction", 0, 1, False, True), ("cond_drop", 0, 1),
        ("decay_fraction", 0, 1),
        ("num_res_blocks", 1, 64), ("space_to_depth", 1, 8)]
    for name, low, high, *open_ends in ranges:
        if flags.get(name) is not None:
            check_number("--" + name.replace("_", "-"), flags[name], low, high, *open_ends)
    for name in ("channel_mult", "attn_resolutions"):
        for value in flags.get(name) or ():
            check_number("--" + name.replace("_", "-"), value, 1, 65536)

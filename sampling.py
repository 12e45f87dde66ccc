"""The sampling driver shared by train.py (its grids and scores), sample.py and evaluate.py: n
images drawn batch by batch from one seeded generator with Ho et al.'s Algorithm 2 or DDIM,
guided towards classes for a class-conditional model; the sampler's flags and its defaults,
written here once.
"""
import sys
import time

import torch
from tqdm import tqdm

import ddpm
from cli import UserError, check, check_number

SAMPLERS = ("ddpm", "ddim", "dpm")
# The default sampler everywhere (sample.py, evaluate.py, the training grids and scores): DDIM-50
# at eta 1, Algorithm 2 on the 50-step respaced chain, the best quality per second in the sampler
# table of docs/results.md.
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
DEFAULT_ETA = 1.0
# The guidance weight w of a class-conditional model (ε̃ = (1 + w) ε(x_t, c) - w ε(x_t, ∅)), chosen
# by the table in docs/results.md.
DEFAULT_GUIDANCE = 0.25


def add_arguments(p):
    """--sampler, --steps and --eta, as sample.py and evaluate.py take them."""
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="ddim: Song et al. 2021 over --steps respaced steps; ddpm: Ho et al.'s "
                   "Algorithm 2 over all T steps (T/--steps times the network calls); dpm: "
                   "DPM-Solver++(2M) (Lu et al. 2022) over --steps steps, deterministic")
    p.add_argument("--steps", type=int, help=f"DDIM or DPM-Solver steps (default: "
                   f"{DEFAULT_STEPS}, or the model's T if smaller)")
    p.add_argument("--eta", type=float, help="DDIM eta: 1 is Algorithm 2 on the respaced chain "
                   "(the best quality per second in the sampler table of docs/results.md), 0 the "
                   f"deterministic DDIM; --sampler ddim only (default: {DEFAULT_ETA:g})")
    p.add_argument("--no-clip", action="store_true", help="do not clip the network's x_0 "
                   "estimate to [-1, 1] at each step (clipping, Ho et al.'s sampler, is on "
                   "unless the checkpoint says otherwise)")


def check_arguments(args):
    """What add_arguments' flags must be, before any checkpoint is read."""
    if args.steps is not None:
        check_number("--steps", args.steps, 1, 100_000)
    if args.eta is not None:
        check_number("--eta", args.eta, 0)
        check(args.sampler == "ddim", f"--eta is DDIM's, and --sampler {args.sampler} takes none; "
              "drop --eta or use --sampler ddim")
    args.eta = DEFAULT_ETA if args.eta is None else args.eta


def add_class_arguments(p, counts="each"):
    """--class and --guidance, as sample.py ("each": --n images of each class) and evaluate.py
    ("total": the samples shared among the classes) take them; see class_labels."""
    what = ("--n images of each (one grid row per class when there are several); with --inpaint "
            "or --edit, one class for all the images or one each" if counts == "each" else
            "the samples shared equally among them")
    default = (" (with --inpaint or --edit: the .npz's labels, if any)" if counts == "each"
               else "")
    p.add_argument("--class", dest="classes", metavar="C", help="for a class-conditional model: "
                   "a class (7), several (0,1,2) or all, by index or by the data's class names, "
                   f"{what}; {NO_CLASS}: the null label, the model's unconditional half (default: "
                   "classes drawn from the seed as often as the training labels have them, so "
                   f"the samples model the data as a whole, ordered by class{default})")
    p.add_argument("--guidance", type=float, metavar="W",
                   help="for a class-conditional model: classifier-free guidance weight w (Ho & "
                   "Salimans 2022): ε = (1 + w) ε(x, class) - w ε(x, no class); 0 is the "
                   "conditional model alone. Each step then calls the network on twice "
                   "--batch-size images (the conditional and the unconditional half); diffusers' "
                   f"guidance_scale is 1 + w (default: {DEFAULT_GUIDANCE:g} for the classes of "
                   "--class or of the images; 0 for classes drawn as the training labels have "
                   "them)")


def check_class_arguments(args):
    """What add_class_arguments' flags must be, before any checkpoint is read (--guidance stays
    None when not given, until guidance_for knows the model)."""
    if args.guidance is not None:
        check_number("--guidance", args.guidance, 0, 1000)
    check(args.classes is None or args.classes.strip(), "--class is empty; give a class, "
          f"several (0,1,2), all or {NO_CLASS}")


NO_CLASS = "none"  # --class none: the null label (where the data has no class of that name)


def guidance_for(guidance, config, asked=None):
    """The guidance weight for a model with config `config` asked for classes `asked`: --guidance;
    else DEFAULT_GUIDANCE for classes asked (--class, or an edit's images' own labels), 0 for
    classes drawn as the training labels have them (asked None: the samples then model the data
    as a whole, not typical members of each class) or the null label. UserError for --guidance
    on a model that is not class-conditional, where it would do nothing."""
    conditional = config["net"].get("num_classes") is not None
    check(guidance is None or conditional, "--guidance weighs a class-conditional model's "
          "classes, and this model is not class-conditional; drop --guidance")
    if guidance is not None:
        return guidance
    return 0.0 if asked is None or asked.strip() == NO_CLASS else DEFAULT_GUIDANCE


# What class_labels' n counts: the images of each class asked (sample.py's --n), the images in
# all, shared equally among the classes asked (evaluate.py's samples, the training grids and
# scores), or the images of an edit, one label each (sample.py --inpaint / --edit).
COUNTS = ("each", "total", "images")


def class_labels(asked, n, config, seed=0, counts="each"):
    """(labels LongTensor, images per grid row or None) for --class `asked` ("7", "0,1,2", "all",
    by index or by class name, or NO_CLASS) on a model with config `config`, in the order asked;
    what n counts:
      "each"    n of each class asked (one grid row of n per class when there are several);
      "total"   about n in all: one class n times, several max(1, n // classes) times each (one
                grid row each);
      "images"  n images, one label each: one class for all, or exactly n classes one each; None
                gives (None, None) (the images' own labels, if any, stand).
    None (each, total) draws n classes from the seed, each as often as the training labels have
    it (config["class_counts"]; uniformly where the model does not know them), sorted (the grid
    ordered by class); NO_CLASS gives n null labels (index K: the unconditional model). (None,
    None) for a model without classes. UserError for --class on such a model, a class it does not
    have, or (images) a count of classes that is neither 1 nor n."""
    num_classes = config["net"].get("num_classes")
    if num_classes is None:
        check(asked is None, "--class asks for a class, and this model is not class-conditional "
              "(train one with --class-cond)")
        return None, None
    if asked is None:
        if counts == "images":
            return None, None
        g = torch.Generator().manual_seed(seed)
        frequencies = config.get("class_counts")
        if frequencies is None or n == 0:  # (multinomial draws at least one)
            return torch.randint(0, num_classes, (n,), generator=g).sort().values, None
        drawn = torch.multinomial(torch.tensor(frequencies, dtype=torch.float64), n,
                                  replacement=True, generator=g)
        return drawn.sort().values, None
    names = list(config.get("class_names") or ())
    if len(names) != num_classes:  # none, or a run resumed on changed classes before that was
        names = list(map(str, range(num_classes)))  # refused: the network's indices alone
    if asked.strip() == NO_CLASS and NO_CLASS not in names:
        return torch.full((n,), num_classes, dtype=torch.long), None
    if asked.strip() == "all":
        chosen = list(range(num_classes))
    else:
        chosen = [_class_index(part.strip(), names) for part in asked.split(",")]
    k = len(chosen)
    if counts == "images":
        check(k in (1, n), f"--class {asked} names {k} classes for {n} images; give one class "
              "for all or one each")
        return torch.tensor(chosen).repeat_interleave(n // k), None
    per = n if counts == "each" or k == 1 else max(1, n // k)
    return torch.tensor(chosen).repeat_interleave(per), (per if k > 1 else None)


def _class_index(part, names):
    if part in names:
        return names.index(part)
    if part.isascii() and part.isdigit() and int(part) < len(names):  # not ² or ٣: int() fails
        return int(part)
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise UserError(f"--class {part!r} is not one of the model's {len(names)} classes (0-"
                    f"{len(names) - 1}: {shown})")


def steps_for(sampler, steps, diffusion):
    """--steps for this model (None: DEFAULT_STEPS, or T if smaller). DDIM cannot take more steps
    than the model's T: say so before any sampling starts."""
    steps = steps or min(DEFAULT_STEPS, diffusion.num_timesteps)
    check(sampler == "ddpm" or 1 <= steps <= diffusion.num_timesteps,
          f"--steps {steps} must be in [1, the model's T = {diffusion.num_timesteps}] for "
          f"{sampler.upper()}")
    return steps


def clips(config, args):
    """Whether to clip x̂_0 to [-1, 1] at each step: the checkpoint's setting (an imported model's
    scheduler may say no; on otherwise), and never with --no-clip."""
    return config.get("clip_denoised", True) and not args.no_clip


def ticking(bar):
    """A `progress` for ddpm.py's loops that moves `bar` one step per item, so that one bar spans
    every batch of a long job and shows its time estimate from the start."""
    def progress(iterable, desc):
        for item in iterable:
            yield item
            bar.update(1)
    return progress


def expected_time(what, network, shape, batch, calls, device, guided=False):
    """Before a long job starts, one line saying about how long it will take: `calls` network
    calls at `batch` images, timed from one call (after one to warm up)."""
    batch = batch * (2 if guided else 1)  # guidance doubles each call's batch
    x = torch.zeros((batch, *shape), device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        network(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        network(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) * calls
    if seconds > LONG_S:
        print(f"{what}: about {seconds / 60:.0f} minutes here ({calls} network calls of "
              f"{batch} images)", file=sys.stderr)
    return seconds


LONG_S = 60  # a job longer than this says how long it will take before it starts


def network_calls(sampler, steps, diffusion):
    """The steps of a sampling loop, one network call each: T for Algorithm 2, the respaced
    chain's length for DDIM."""
    if sampler == "dpm":
        return len(diffusion.dpm_solver_timesteps(steps))
    return diffusion.num_timesteps if sampler == "ddpm" else len(diffusion.ddim_timesteps(steps))


def describe(sampler, steps, eta, diffusion):
    """The sampler's name in reports: DDPM-1000, DDIM-50 eta=0, or DPM-Solver++(2M)-20."""
    if sampler == "ddpm":
        return f"DDPM-{diffusion.num_timesteps}"
    if sampler == "dpm":
        return f"DPM-Solver++(2M)-{steps}"
    return f"DDIM-{steps} eta={eta:g}"


def generate(network, diffusion, shape, n, batch_size, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS,
             eta=DEFAULT_ETA, seed=0, device="cpu", trajectory=0, progress=True,
             clip_denoised=True, labels=None, guidance=DEFAULT_GUIDANCE, null_label=None,
             self_cond=False):
    """n images in [-1, 1] ([n, *shape]); with trajectory=K also [n, K, *shape] snapshots of x_t.

    network(x_t, t) is the model as the diffusion calls it (float32 out); for a class-conditional
    model, network(x_t, t, y), given `labels` (LongTensor [n]) and guided with weight `guidance`
    towards them (`null_label`: the index it was trained with for "no class"). Images are drawn
    batch by batch from one generator on `device` seeded with `seed`, so the same seed and batch
    size give the same images. clip_denoised: x̂_0 clipped to [-1, 1] at each step (Ho et al.'s
    sampler). self_cond: a self-conditioned network (its pred_x0 argument), fed each step's x̂_0
    at the next (chain_model)."""
    g = torch.Generator(device).manual_seed(seed)
    starts = range(0, n, batch_size)
    calls = network_calls(sampler, steps, diffusion)
    # One bar over every network call, so the time estimate is there from the first seconds.
    bar = tqdm(total=len(starts) * calls, desc=f"sampling {n} images", unit="step",
               disable=not progress, leave=False)

    images, snaps = [], []
    with torch.no_grad(), bar:
        for start in starts:
            b = min(batch_size, n - start)
            kw = dict(generator=g, device=device, trajectory=trajectory, progress=ticking(bar),
                      clip_denoised=clip_denoised)
            model = chain_model(network, diffusion, None if labels is None else
                                labels[start:start + b], null_label, guidance, clip_denoised,
                                self_cond)
            if sampler == "ddpm":
                out = diffusion.p_sample_loop(model, (b, *shape), **kw)
            elif sampler == "dpm":
                out = diffusion.dpm_solver_sample_loop(model, (b, *shape), steps=steps, **kw)
            else:
                out = diffusion.ddim_sample_loop(model, (b, *shape), steps=steps, eta=eta, **kw)
            x, traj = out if trajectory else (out, None)
            images.append(x)
            if traj is not None:
                snaps.append(traj["x_t"].transpose(0, 1))
    return torch.cat(images), (torch.cat(snaps) if snaps else None)


def chain_model(network, diffusion, labels=None, null_label=None, guidance=DEFAULT_GUIDANCE,
                clip_denoised=True, self_cond=False):
    """model(x_t, t) for the samplers, for ONE chain (a batch from x_T, or an edit's): the network
    of a self-conditioned model fed the previous step's x̂_0 (ddpm.self_conditioned, below the
    guidance: the conditional and the null half keep their own), then guided towards `labels`
    (conditioned) when it is class-conditional. Every sampling loop (generate, editing.run)
    builds its model here, one per chain."""
    if self_cond:
        network = ddpm.self_conditioned(network, diffusion, clip_denoised)
    return network if labels is None else conditioned(network, labels, null_label, guidance,
                                                      diffusion)


def conditioned(network, labels, null_label, guidance, diffusion):
    """model(x_t, t) of a class-conditional network for the samplers: guided towards `labels`
    with weight `guidance` (ddpm.guided_model: one network call on the doubled batch, the
    guidance on the mean only where the variance is learned); w = 0, the conditional model
    alone (one call on the batch)."""
    if guidance == 0:
        return lambda x_t, t: network(x_t, t, labels.to(x_t.device))
    return ddpm.guided_model(network, labels, null_label, guidance,
                             diffusion.var_type == "learned_range")

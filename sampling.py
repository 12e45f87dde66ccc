"""The sampling driver shared by train.py (its grids and scores), sample.py and evaluate.py: n
images drawn batch by batch from one seeded generator with Ho et al.'s Algorithm 2 or DDIM; the
sampler's flags and its defaults, written here once.
"""
import torch
from tqdm import tqdm

from cli import check, check_number

SAMPLERS = ("ddpm", "ddim")
# The default sampler everywhere (sample.py, evaluate.py, the training grids and scores): DDIM-50
# at eta 1, Algorithm 2 on the 50-step respaced chain, the best quality per second in the sampler
# table of docs/results.md.
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50
DEFAULT_ETA = 1.0


def add_arguments(p):
    """--sampler, --steps and --eta, as sample.py and evaluate.py take them."""
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="ddim: Song et al. 2021 over --steps respaced steps; ddpm: Ho et al.'s "
                   "Algorithm 2 over all T steps (T/--steps times the network calls)")
    p.add_argument("--steps", type=int, help=f"DDIM steps (default: {DEFAULT_STEPS}, or the "
                   "model's T if smaller)")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="DDIM eta: 1 is Algorithm 2 on "
                   "the respaced chain (the best quality per second in the sampler table of "
                   "docs/results.md), 0 the deterministic DDIM")


def check_arguments(args):
    """What add_arguments' flags must be, before any checkpoint is read."""
    if args.steps is not None:
        check_number("--steps", args.steps, 1, 100_000)
    check_number("--eta", args.eta, 0)


def steps_for(sampler, steps, diffusion):
    """--steps for this model (None: DEFAULT_STEPS, or T if smaller). DDIM cannot take more steps
    than the model's T: say so before any sampling starts."""
    steps = steps or min(DEFAULT_STEPS, diffusion.num_timesteps)
    check(sampler != "ddim" or 1 <= steps <= diffusion.num_timesteps,
                  f"--steps {steps} must be in [1, the model's T = {diffusion.num_timesteps}] "
                  "for DDIM")
    return steps


def network_calls(sampler, steps, diffusion):
    """The steps of a sampling loop, one network call each: T for Algorithm 2, the respaced
    chain's length for DDIM."""
    return diffusion.num_timesteps if sampler == "ddpm" else len(diffusion.ddim_timesteps(steps))


def describe(sampler, steps, eta, diffusion):
    """The sampler's name in reports: DDPM-1000, or DDIM-50 eta=0."""
    if sampler == "ddpm":
        return f"DDPM-{diffusion.num_timesteps}"
    return f"DDIM-{steps} eta={eta:g}"


def generate(network, diffusion, shape, n, batch_size, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS,
             eta=DEFAULT_ETA, seed=0, device="cpu", trajectory=0, progress=True,
             clip_denoised=True):
    """n images in [-1, 1] ([n, *shape]); with trajectory=K also [n, K, *shape] snapshots of x_t.

    network(x_t, t) is the model as the diffusion calls it (float32 out). Images are drawn batch by
    batch from one generator on `device` seeded with `seed`, so the same seed and batch size give
    the same images. clip_denoised: x̂_0 clipped to [-1, 1] at each step (Ho et al.'s sampler)."""
    g = torch.Generator(device).manual_seed(seed)
    starts = range(0, n, batch_size)
    calls = network_calls(sampler, steps, diffusion)
    # One bar over every network call, so the time estimate is there from the first seconds.
    bar = tqdm(total=len(starts) * calls, desc=f"sampling {n} images", unit="step",
               disable=not progress, leave=False)

    def ticking(iterable, desc):
        for item in iterable:
            yield item
            bar.update(1)

    images, snaps = [], []
    with torch.no_grad(), bar:
        for start in starts:
            b = min(batch_size, n - start)
            kw = dict(generator=g, device=device, trajectory=trajectory, progress=ticking,
                      clip_denoised=clip_denoised)
            out = (diffusion.p_sample_loop(network, (b, *shape), **kw) if sampler == "ddpm" else
                   diffusion.ddim_sample_loop(network, (b, *shape), steps=steps, eta=eta, **kw))
            x, traj = out if trajectory else (out, None)
            images.append(x)
            if traj is not None:
                snaps.append(traj["x_t"].transpose(0, 1))
    return torch.cat(images), (torch.cat(snaps) if snaps else None)

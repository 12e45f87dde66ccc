"""Generate images from a trained DDPM: `python sample.py`.

With no flags: the newest checkpoint under runs/, its EMA weights, Ho et al.'s sampler
(Algorithm 2, all T steps), 64 images written as a grid to samples.png. The model is rebuilt from
the config stored in the checkpoint; the same seed gives the same images.

    python sample.py --ckpt runs/mnist --sampler ddim --steps 50 --n 16 --out ddim.png
    python sample.py --out samples.npz --n 10000          # uint8 array [N, H, W(, C)]
    python sample.py --trajectory 10 --n 8                # x_t at 10 values of t, one row a sample
"""
import sys

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import ddpm
import train
import unet


def parse_args(argv=None):
    p = train.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint file or run directory (default: newest under runs/)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: Ho et al. Algorithm 2 over all T steps; ddim: Song et al. 2021")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help=".png grid or .npz of uint8 images")
    p.add_argument("--trajectory", type=int, default=0, metavar="K",
                   help="write x_t at K evenly spaced steps instead: one row per image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (CUDA graphs on a GPU); pays off for long runs")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast for the network (default: what the run trained in)")
    args = p.parse_args(argv)
    checks = [(args.n >= 1, f"--n must be >= 1, got {args.n}"),
              (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
              (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
              (args.eta >= 0, f"--eta must be >= 0, got {args.eta}"),
              (args.trajectory >= 0, f"--trajectory must be >= 0, got {args.trajectory}"),
              (args.out.endswith((".png", ".npz")), f"--out must end in .png or .npz, got {args.out}")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def load_model(path, device, use_ema=True):
    """(network, diffusion, config, training step) rebuilt from a checkpoint alone."""
    state = checkpoint.load(path, map_location=device)
    cfg = state["config"]
    model = unet.UNet(**cfg["unet"]).to(device)
    checkpoint.load_weights(model, state["ema" if use_ema else "model"], path)
    diffusion = ddpm.GaussianDiffusion(ddpm.make_beta_schedule(cfg["schedule"], cfg["timesteps"]),
                                       cfg["mean_type"], cfg["var_type"], cfg["loss_type"])
    return model.eval(), diffusion, cfg, state["step"]


def check_steps(sampler, steps, diffusion):
    """DDIM cannot take more steps than the model's T: say so before any sampling starts."""
    if sampler == "ddim" and steps > diffusion.num_timesteps:
        raise train.TrainError(f"--steps {steps} exceeds the model's T = {diffusion.num_timesteps}")


def generate(model, diffusion, n, batch_size, sampler="ddpm", steps=50, eta=0.0, seed=0,
             precision="fp32", trajectory=0, progress=True, compile=False):
    """n images in [-1, 1] ([n, C, H, W]); with trajectory=K also [n, K, C, H, W] snapshots of x_t.

    Images are drawn batch by batch from one generator seeded with `seed`. compile=True runs the
    network through torch.compile (on CUDA with CUDA graphs: mode "reduce-overhead")."""
    device = next(model.parameters()).device
    shape = (model.in_channels, model.image_size, model.image_size)
    network = model
    if compile:
        network = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)

    def net(x, t):
        with train.autocast(precision, device):
            return network(x, t).float()

    g = torch.Generator(device).manual_seed(seed)
    images, snaps = [], []
    batches = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    with torch.no_grad(), tqdm(total=n, unit="img", disable=not progress) as bar:
        for b in batches:
            kw = dict(generator=g, device=device, trajectory=trajectory)
            out = (diffusion.p_sample_loop(net, (b, *shape), **kw) if sampler == "ddpm" else
                   diffusion.ddim_sample_loop(net, (b, *shape), steps=steps, eta=eta, **kw))
            x, traj = out if trajectory else (out, None)
            images.append(x)
            if traj is not None:
                snaps.append(traj["x_t"].transpose(0, 1))
            bar.update(b)
    return torch.cat(images), (torch.cat(snaps) if snaps else None)


def write(path, images, nrow=None):
    """uint8 images [N, C, H, W] -> a PNG grid (nrow per row), or an .npz with key "images"
    ([N, H, W] or [N, H, W, C]), written atomically."""
    if path.endswith(".npz"):
        array = images.transpose(0, 2, 3, 1)
        array = array[..., 0] if array.shape[-1] == 1 else array
        data.atomic_write(path, lambda f: np.savez(f, images=array))
    else:
        data.save_png(path, data.make_grid(images, nrow=nrow))


def sampling_precision(asked, cfg):
    """The network's precision for sampling: `asked` (fp32 / bf16), or with "auto" the one the
    model trained in; fp16 is sampled in fp32 (no gradient scaling to protect it there)."""
    precision = asked if asked != "auto" else cfg.get("precision", "fp32")
    return precision if precision == "bf16" else "fp32"


def main(argv=None):
    args = parse_args(argv)
    try:
        device = train.pick_device(args.device, 0)
        path = checkpoint.resolve(args.ckpt) if args.ckpt else checkpoint.newest()
        model, diffusion, cfg, _ = load_model(path, device, use_ema=not args.no_ema)
        check_steps(args.sampler, args.steps, diffusion)
        precision = sampling_precision(args.precision, cfg)
        name = (f"DDPM-{diffusion.num_timesteps}" if args.sampler == "ddpm"
                else f"DDIM-{args.steps} eta={args.eta:g}")
        print(f"sampling {args.n} images from {path} with {name} ({precision})", file=sys.stderr)
        x, traj = generate(model, diffusion, args.n, args.batch_size, args.sampler, args.steps,
                           args.eta, args.seed, precision, args.trajectory,
                           compile=args.compile)
        nrow = None
        if traj is not None:  # one row per image: x_t at the K snapshots, then x_0
            rows = torch.cat([traj, x[:, None]], 1)
            x, nrow = rows.reshape(-1, *rows.shape[2:]), rows.shape[1]
        write(args.out, data.to_uint8(x).cpu().numpy(), nrow)
        print(f"wrote {args.out}", file=sys.stderr)
    except (checkpoint.CheckpointError, train.TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

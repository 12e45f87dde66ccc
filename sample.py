"""Generate images from a trained DDPM: `python sample.py`.

With no flags: the newest checkpoint under runs/, its EMA weights, DDIM over 50 respaced steps
with eta 1 (Algorithm 2 on the respaced chain; --sampler ddpm for all T steps), 64 images
written as a grid to samples.png. The model is rebuilt from the config stored in the checkpoint;
the same seed gives the same images.

    python sample.py --ckpt runs/mnist --sampler ddim --steps 50 --n 16 --out ddim.png
    python sample.py --out samples.npz --n 10000          # uint8 array [N, H, W(, C)]
    python sample.py --trajectory 10 --n 8                # x_t at 10 values of t, one row a sample
    python sample.py --inpaint digit.png --mask mask.png  # fill in where the mask is black
    python sample.py --inpaint digit.png --mask mask.png --particles 8   # twisted SMC
    python sample.py --edit sketch.png --strength 0.5     # SDEdit: noise half-way, denoise
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: hardware.py says why
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import torch

import checkpoint
import cli
import editing
import files
import hardware
import imaging
import sampling


def parse_args(argv=None):
    """The flags, every one checked before the checkpoint is read."""
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint file or run directory (default: the newest "
                   "ckpt.pt under runs/)")
    p.add_argument("--n", type=int, help="number of images (with --class: of each class asked) "
                   "(default: 64); with --inpaint or --edit, results for each input image "
                   "(default: 1)")
    p.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    sampling.add_arguments(p)
    sampling.add_class_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", default="samples.png", help=".png grid, or .npz of uint8 images")
    p.add_argument("--trajectory", type=int, default=0, metavar="K",
                   help="write x_t at K evenly spaced steps instead: one row per image")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    checkpoint.add_ema_length_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (CUDA graphs on a GPU); pays off for long runs")
    editing.add_arguments(p)
    hardware.add_arguments(p)
    args = p.parse_args(argv)
    job = editing.check_arguments(args)
    args.n = args.n if args.n is not None else 1 if job else 64
    cli.check_number("--n", args.n, 1, 10_000_000)
    cli.check_number("--batch-size", args.batch_size, 1, 1_000_000)
    cli.check_number("--seed", args.seed, 0, cli.MAX_COUNT)
    sampling.check_arguments(args)
    sampling.check_class_arguments(args)
    cli.check_number("--trajectory", args.trajectory, 0, 100_000)
    checkpoint.check_ema_length(args.ema_length)
    cli.check(not (args.no_ema and args.ema_length is not None), "--no-ema samples the raw "
              "weights and --ema-length a reconstructed EMA; give one of them")
    cli.check(args.out.endswith((".png", ".npz")),
                  f"--out must end in .png or .npz, got {args.out}")
    files.check_writable(args.out)
    return args


def write(path, images, nrow=None, labels=None):
    """uint8 images [N, C, H, W] -> a PNG grid (nrow per row), or an .npz with key "images"
    ([N, H, W] or [N, H, W, C]) and, for a class-conditional model, "labels" ([N]), written
    atomically."""
    if path.endswith(".npz"):
        array = images.transpose(0, 2, 3, 1)
        array = array[..., 0] if array.shape[-1] == 1 else array
        extra = {} if labels is None else {"labels": labels.cpu().numpy()}
        files.write_file(path, lambda f: np.savez(f, images=array, **extra))
    else:
        imaging.save_png(path, imaging.make_grid(images, nrow=nrow))


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    path = checkpoint.resolve(args.ckpt) if args.ckpt else checkpoint.newest()
    model = checkpoint.load_model(path, device, args.precision, use_ema=not args.no_ema,
                                  compile=args.compile, ema_length=args.ema_length)
    args.steps = sampling.steps_for(args.sampler, args.steps, model.diffusion)
    editing_ = args.inpaint or args.edit  # the images' own classes, or --class: classes asked
    args.guidance = sampling.guidance_for(args.guidance, model.config,
                                          args.classes or ("given" if editing_ else None))
    if editing_:
        return fill_or_edit(args, model, path, device)
    name = sampling.describe(args.sampler, args.steps, args.eta, model.diffusion)
    calls = sampling.network_calls(args.sampler, args.steps, model.diffusion)
    cli.check(args.trajectory <= calls, f"--trajectory {args.trajectory} asks for more snapshots "
              f"than the {calls} steps of {name}; give at most {calls}")
    labels, nrow = sampling.class_labels(args.classes, args.n, model.config, args.seed)
    n = args.n if labels is None else len(labels)
    guided = "" if labels is None else f", guidance w = {args.guidance:g}"
    print(f"sampling {n} images from {path} with {name} ({model.precision}{guided})",
          file=sys.stderr)
    shape = (model.module.in_channels, model.module.image_size, model.module.image_size)
    x, traj = sampling.generate(model.network, model.diffusion, shape, n, args.batch_size,
                                args.sampler, args.steps, args.eta, args.seed, device,
                                args.trajectory, clip_denoised=sampling.clips(model.config, args),
                                labels=labels, guidance=args.guidance,
                                null_label=model.module.null_label,
                                self_cond=model.module.self_cond)
    if traj is not None:  # one row per image: x_t at the K snapshots, then x_0
        rows = torch.cat([traj, x[:, None]], 1)
        x, nrow = rows.reshape(-1, *rows.shape[2:]), rows.shape[1]
    write(args.out, imaging.to_uint8(x).cpu().numpy(), nrow, labels)
    print(f"wrote {args.out}", file=sys.stderr)


def fill_or_edit(args, model, path, device):
    """--inpaint or --edit: read the images (and masks), run editing.run, write the grid of input
    | (mask |) results, or the results as an .npz."""
    job = "inpaint" if args.inpaint else "edit"
    shape = (model.module.in_channels, model.module.image_size, model.module.image_size)
    images, given = editing.read_images(args.inpaint or args.edit, shape)
    masks = editing.read_masks(args.mask, shape, len(images)) if job == "inpaint" else None
    labels = editing.labels_for(args.classes, len(images), model.config, given)
    chain = editing.chain(model.diffusion, args.sampler, args.steps)
    if job == "inpaint" and args.particles > 1:
        how = f"twisted SMC, {args.particles} particles an image"
    elif job == "inpaint":
        editing.check_repaint(len(chain), args.resample, args.jump_length)
        how = f"RePaint r = {args.resample}, j = {args.jump_length}"
    else:
        how = (f"strength {args.strength:g}: the last "
               f"{editing.strength_steps(args.strength, len(chain))} of {len(chain)} steps")
    name = sampling.describe(args.sampler, args.steps, args.eta, model.diffusion)
    guided = "" if labels is None else f", guidance w = {args.guidance:g}"
    print(f"{'filling' if job == 'inpaint' else 'editing'} {len(images)} images x {args.n} from "
          f"{path} with {name}, {how} ({model.precision}{guided})", file=sys.stderr)
    repeat = lambda a: None if a is None else a.repeat_interleave(args.n, 0)  # --n each, in turn
    x = editing.run(job, model.network, model.diffusion, repeat(editing.to_model_range(images)),
                    masks if masks is None or len(masks) == 1 else repeat(masks), repeat(labels),
                    args.batch_size, args.sampler, args.steps, args.eta, args.resample,
                    args.jump_length, args.strength, args.seed, device,
                    sampling.clips(model.config, args), args.guidance, model.module.null_label,
                    self_cond=model.module.self_cond, particles=args.particles or 1)
    out = imaging.to_uint8(x).cpu().numpy()
    if args.out.endswith(".npz"):
        write(args.out, out, labels=repeat(labels))
    else:
        grid, nrow = editing.grid_rows(images, out, args.n, masks)
        write(args.out, grid, nrow)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)

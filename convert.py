"""Convert between this project's checkpoints and diffusers' DDPM folders.

    python convert.py --from-diffusers DIR --out ckpt.pt     # e.g. google/ddpm-cifar10-32
    python convert.py --to-diffusers runs/mnist --out DIR    # DDPMPipeline.from_pretrained(DIR)

Import takes a pipeline folder (model_index.json, unet/, scheduler/) or a UNet2DModel folder
(config.json and diffusion_pytorch_model.safetensors or .bin; the scheduler is then diffusers'
DDPMScheduler default, and the conversion says so). The network config maps to unet.py's, the
weights are renamed, and the scheduler maps to ddpm.py's: the β table (a named schedule where it
is one, else the table itself), T, the prediction type, the variance type and clipping. The
checkpoint it writes is read by sample.py and evaluate.py (give evaluate.py --dataset: an
imported model names none). Export writes a DDPMPipeline folder of the EMA weights (--no-ema:
the raw ones). Weights are read with the safetensors package or torch.load(weights_only=True):
nothing read executes code. What one side cannot express is refused in one line naming it.
"""

import os
import sys

import checkpoint
import cli
import files
import interop


# ---- command line ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="DIR",
                     help="a diffusers DDPM pipeline folder or UNet2DModel folder to import")
    way.add_argument("--to-diffusers", metavar="CKPT",
                     help="a checkpoint file or run directory to export as a DDPMPipeline folder")
    p.add_argument("--out", required=True, help="the checkpoint file to write (import) or the "
                   "folder to create (export)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (a "
                   "checkpoint file, or for an export a folder an earlier export wrote)")
    args = p.parse_args(argv)
    if os.path.lexists(args.out):
        cli.check(args.overwrite, f"--out {args.out} exists; choose another path or add "
                  "--overwrite to replace it")
    if args.to_diffusers:  # a folder, written beside itself and swapped in
        interop.check_export_out(args.out)
        files.check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out", args.out)
    else:
        files.check_writable(args.out)
    return args


def main(argv=None):
    args = parse_args(argv)
    say = lambda line: print(line, file=sys.stderr)
    if args.from_diffusers:
        config = interop.import_diffusers(args.from_diffusers, args.out, say)
        size = config["net"]["image_size"]
        say(f"wrote {args.out}: {size}x{size} network, {config['schedule']} schedule, "
            f"T = {config['timesteps']}, {config['diffusion']['mean_type']}, "
            f"{config['diffusion']['var_type']}")
    else:
        path = checkpoint.resolve(args.to_diffusers)
        interop.export_diffusers(path, args.out, use_ema=not args.no_ema, progress=say)
        say(f"wrote {args.out}: load it with DDPMPipeline.from_pretrained({args.out!r})")


if __name__ == "__main__":
    cli.run_script(main)

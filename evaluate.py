"""Evaluate a trained DDPM: `python evaluate.py --ckpt runs/mnist`.

NLL: test-set bits/dim from the full variational bound (Ho et al. 2020 Eq. 5: T steps, discretized
decoder, prior), with its standard error and its three parts L_T, Σ L_{t-1}, L_0. A
self-conditioned model (--self-cond) is bounded with x̂_0 from x_t itself, two network calls per t
(ddpm.self_conditioned_twice): the samplers' chain, fed the previous step's x̂_0, has no such bound.

Sample quality (28x28 datasets with labels): a small CNN classifier trained once on the training
split (cached under the data cache, keyed by the data's checksum) is the feature extractor. For
--samples generated images: the Fréchet distance of its penultimate features to the test set
("FD", computed with this network and not comparable to Inception FID), the same FD for as many
real training images (the floor), the share of samples classified with confidence > 0.9, the
entropy of the predicted-class histogram (log 10 = 2.303 when balanced), and precision and recall
on the same features (Kynkäänniemi et al. 2019, k = 3).

FID (--fid, any dataset): the Fréchet distance in the pool features of the FID Inception network
(fid.py, pytorch-fid's port of the TensorFlow one) between --fid generated images (or the saved
samples of --fid-of) and the training set (up to 50,000 of its images), with the floor: as many
held-out real images against the same statistics. Papers report 50,000 samples (Ho et al. 2020,
Table 1: CIFAR-10 FID 3.17); FID falls as N grows, so compare numbers at the same N only.

Results go to stdout as a table and to eval.json beside the checkpoint (or --json).
"""
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: hardware.py says why
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import cli
import data
import ddpm
import fid
import files
import hardware
import imaging
import metrics
import rundir
import sampling
import userdata


# ---- the evaluation --------------------------------------------------------------------------

def nll_bits_per_dim(network, diffusion, images, batch_size, seed=0, device="cpu", progress=True,
                     labels=None):
    """Per-image bound terms over uint8 images [N, C, H, W]: dict of [N] arrays "total", "prior"
    (L_T), "denoising" (Σ_{t>=2} L_{t-1}), "decoder" (L_0), in bits/dim. Give it the network in
    fp32: the bound is a sum of 1,000 terms, and a low-precision bias in each would add up. With
    `labels` ([N] class indices) a class-conditional network is given each image's class: the
    bound of -log p(x | y); without, a class-conditional network sees the null label: -log p(x)."""
    g = torch.Generator(device).manual_seed(seed)
    parts = {"total": [], "prior": [], "denoising": [], "decoder": []}
    batches = range(0, len(images), batch_size)
    # One bar over every network call (batches x T), so the time estimate is there from the start.
    bar = tqdm(total=len(batches) * diffusion.num_timesteps, desc="NLL", unit="step",
               disable=not progress)

    for i in batches:
        x0 = imaging.to_model_range(torch.from_numpy(images[i:i + batch_size]).to(device))
        given = network if labels is None else sampling.conditioned(  # unguided: the model alone
            network, torch.as_tensor(labels[i:i + batch_size], device=device), None, 0.0, diffusion)
        out = diffusion.calc_bpd_loop(given, x0, clip_denoised=True, generator=g,
                                      progress=sampling.ticking(bar))
        for key, value in (("total", out["total_bpd"]), ("prior", out["prior_bpd"]),
                           ("denoising", out["vb"][:, 1:].sum(1)), ("decoder", out["vb"][:, 0])):
            parts[key].append(value.double().cpu().numpy())
    bar.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def mean_and_se(x):
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


# Defaults that finish in minutes on a CPU; the full test set and 10,000 samples are one flag away.
DEFAULT_NLL_IMAGES = 100
DEFAULT_SAMPLES = 1000


def parse_args(argv=None):
    """The flags, every one checked before any checkpoint, data or model is touched."""
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint file or run directory (default: the newest "
                   "ckpt.pt under runs/)")
    p.add_argument("--n", type=int, default=DEFAULT_NLL_IMAGES,
                   help="test images for the NLL, 0 skips it (default: %(default)s, minutes on a "
                   "CPU; 10000 for all of MNIST's, which is hours on a CPU)")
    p.add_argument("--nll-batch-size", type=int, default=250, help="images per NLL batch")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help="generated images for sample quality, 0 skips it (default: %(default)s; "
                   "10000 for the tables of docs/results.md)")
    p.add_argument("--batch-size", type=int, default=500, help="images per sampling batch")
    sampling.add_arguments(p)
    sampling.add_class_arguments(p, counts="total")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the NLL's noise")
    checkpoint.add_ema_length_argument(p)
    hardware.add_arguments(p, "network autocast for sampling; auto: bf16 where the device runs "
                           "it fast, else fp32 (the NLL always runs in fp32)")
    p.add_argument("--dataset", help="the dataset whose test set to use (default: the one the "
                   "checkpoint was trained on; needed for imported models, which name none)")
    p.add_argument("--data-dir", help="where local dataset files live (default: $DDPM_DATA, "
                   "then the cache)")
    p.add_argument("--nearest", type=int, default=0, metavar="N",
                   help="does the model copy its training images? For N samples, the nearest "
                   "training image by L2 in pixels (and in the classifier's features where one "
                   "exists): the share of samples nearer than all but 5%% of the held-out "
                   "images are (about 0.05 for a model that does not copy), and a PNG of sample "
                   "| nearest pairs, closest first (0: off)")
    p.add_argument("--nearest-png", help="where to write --nearest's pairs (default: "
                   f"{rundir.NEAREST} beside the checkpoint)")
    p.add_argument("--fid", type=int, nargs="?", const=fid.SAMPLES, default=0, metavar="N",
                   help="FID of N generated images against the training set (up to "
                   f"{fid.REFERENCE_MAX:,} of its images), and its floor (N held-out real images); "
                   f"papers report {fid.PAPER_SAMPLES:,} against the training set; the Inception "
                   f"weights {fid.WEIGHTS_FILE} come from $DDPM_CACHE or are downloaded once "
                   f"(without N: {fid.SAMPLES:,}; 0: off)")
    p.add_argument("--fid-of", metavar="PATH",
                   help="FID of saved samples instead: a folder of images or an .npz of uint8 "
                   "images (sample.py --out x.npz), against the training set of --dataset (or of "
                   "--ckpt's dataset, read as the run read it)")
    p.add_argument("--fid-weights", metavar="FILE",
                   help="Inception weights to use instead of the standard file (numbers from "
                   "other weights are not comparable with papers)")
    p.add_argument("--fid-batch-size", type=int, default=50, help="images per Inception batch")
    p.add_argument("--json", help="where to write the results (default: eval.json beside the "
                   "checkpoint; with --fid-of and no --ckpt, not written unless given)")
    args = p.parse_args(argv)
    for flag, value, low, high in (("--n", args.n, 0, 10_000_000),
                                   ("--nearest", args.nearest, 0, 1_000_000),
                                   ("--samples", args.samples, 0, 10_000_000),
                                   ("--nll-batch-size", args.nll_batch_size, 1, 1_000_000),
                                   ("--batch-size", args.batch_size, 1, 1_000_000),
                                   ("--fid", args.fid, 0, 10_000_000),
                                   ("--fid-batch-size", args.fid_batch_size, 1, 100_000),
                                   ("--seed", args.seed, 0, cli.MAX_COUNT)):
        if value is not None:
            cli.check_number(flag, value, low, high)
    cli.check(not 0 < args.samples <= 3, "--samples must be 0 or at least 4 (precision/recall "
              f"use 3 neighbours), got {args.samples}")
    sampling.check_arguments(args)
    sampling.check_class_arguments(args)
    checkpoint.check_ema_length(args.ema_length)
    cli.check(not (args.fid_of and args.ema_length is not None), "--fid-of scores saved samples "
              "and --ema-length chooses a model's weights; drop one of them")
    if args.dataset:
        data.check_name(args.dataset)
    if args.nearest_png:
        cli.check(args.nearest_png.endswith(".png"), f"--nearest-png must end in .png, got "
                  f"{args.nearest_png}")
        files.check_writable(args.nearest_png, "--nearest-png")
    cli.check(not 0 < args.fid < 2, f"--fid needs at least 2 images (a covariance), got {args.fid}")
    if args.fid_of:
        cli.check(os.path.exists(args.fid_of), f"--fid-of: {args.fid_of} does not exist; give a "
                  "folder of images or an .npz file of samples")
        cli.check(args.ckpt or args.dataset, "--fid-of scores samples against a dataset; give "
                  "--dataset NAME (or --ckpt RUN for the run's dataset)")
    if args.fid_weights:
        cli.check(os.path.isfile(args.fid_weights), f"--fid-weights: {args.fid_weights} is not a "
                  "file")
    cli.check(args.n != 0 or args.samples != 0 or args.nearest or args.fid or args.fid_of,
              "--n 0 and --samples 0 leave nothing to evaluate; drop one of them")
    if args.json:
        files.check_writable(args.json, "--json")
    return args


def evaluate(args, path, device, progress=True):
    """The results dict for the checkpoint at `path` (see the module docstring)."""
    model = checkpoint.load_model(path, device, args.precision, ema_length=args.ema_length)
    trained_on = model.config.get("train", {}).get("dataset")
    diffusion, name = model.diffusion, args.dataset or trained_on
    cli.check(name is not None, f"{path} names no dataset (an imported model); give "
              "--dataset NAME for its test set")
    if args.samples or args.nearest:
        args.steps = sampling.steps_for(args.sampler, args.steps, diffusion)
    sampling.class_labels(args.classes, 1, model.config, counts="total")  # checked before any work
    weights = fid_network(args, device) if args.fid else None  # before any long work
    args.guidance = sampling.guidance_for(args.guidance, model.config, args.classes)
    want = (model.module.in_channels, model.module.image_size, model.module.image_size)
    known = data.image_shape(name)
    cli.check(known in (None, want), f"{name} images are {known}, the model takes {want}; "
              "give the --dataset it was trained on")
    cli.check(not args.nearest or not name.startswith("npz:"), f"--nearest compares with held-out "
              f"images, and {name} has none; give a folder: dataset or a named one")
    # A folder is read as the run read it; one the model did not train on, at the model's shape.
    folder = userdata.options_of(model.config["train"]) if name == trained_on else \
        userdata.FolderOptions(image_size=want[1], channels=want[0])
    test_set = load_test_set(name, args.data_dir, progress, folder)
    cli.check(test_set.images.shape[1:] == want, f"{name} images are "
              f"{test_set.images.shape[1:]}, the model takes {want}; give the --dataset it was "
              "trained on")
    results = {"checkpoint": path, "dataset": name, "step": model.step, "device": str(device),
               **({} if args.ema_length is None else {"ema_length": args.ema_length})}

    n = min(args.n, len(test_set.images))
    if n:
        fp32 = hardware.as_called(model.module, "fp32", device,
                                  hardware.channels_last_default(device))
        if model.module.self_cond:  # x̂_0 from x_t itself: two calls per t (see ddpm.py)
            fp32 = ddpm.self_conditioned_twice(fp32, diffusion, clip_denoised=True)
        batch = min(n, args.nll_batch_size)
        # A class-conditional model's bound twice: with the null label (-log p(x), the
        # unconditional bound) and with each image's label (-log p(x | y)).
        given = [("nll", None)]
        if model.module.null_label is not None and test_set.labels is not None:
            given.append(("nll_given_labels", test_set.labels[:n]))
        sampling.expected_time(f"the NLL of {n} images", fp32, want, batch,
                               len(given) * math.ceil(n / batch) * diffusion.num_timesteps, device)
        for key, labels in given:
            start = time.perf_counter()
            parts = nll_bits_per_dim(fp32, diffusion, test_set.images[:n], args.nll_batch_size,
                                     args.seed, device, progress, labels)
            results[key] = {"images": n, "seconds": time.perf_counter() - start,
                            # a user's npz file has no test split: its NLL is on training images
                            "split": {"npz": "training", "folder": "held-out"}.get(
                                name.split(":")[0], "test"),
                            **{k: dict(zip(("mean", "se"), mean_and_se(v)))
                               for k, v in parts.items()}}

    labelled_28 = test_set.labels is not None and test_set.images.shape[2:] == (28, 28)
    if args.samples and not labelled_28:
        print(f"sample quality needs a 28x28 dataset with labels; {name} has none, skipped",
              file=sys.stderr)
    count = max(args.samples if labelled_28 else 0, args.nearest, args.fid)
    labels, _ = sampling.class_labels(args.classes, count, model.config, args.seed,
                                       counts="total")
    if not count:
        return results
    count = count if labels is None else len(labels)
    train_set = data.load_dataset(name, "train", args.data_dir, progress=progress, folder=folder)
    classifier, accuracy = metrics.classifier_for(name, train_set, test_set, device,
                                                  progress=progress) if labelled_28 else (None, None)
    batch = min(count, args.batch_size)
    sampling.expected_time(f"{count} samples", model.network, want, batch, math.ceil(count / batch)
                           * sampling.network_calls(args.sampler, args.steps, diffusion), device,
                           guided=labels is not None and args.guidance != 0)
    start = time.perf_counter()
    x, _ = sampling.generate(model.network, diffusion, test_set.images.shape[1:], count,
                             args.batch_size, args.sampler, args.steps, args.eta, args.seed,
                             device, progress=progress,
                             clip_denoised=sampling.clips(model.config, args),
                             labels=labels, guidance=args.guidance,
                             null_label=model.module.null_label,
                             self_cond=model.module.self_cond)
    seconds = time.perf_counter() - start
    fakes = imaging.to_uint8(x).cpu().numpy()
    sampler = sampling.describe(args.sampler, args.steps, args.eta, diffusion)
    if args.samples and labelled_28:
        n = min(args.samples, count)
        real = train_set.images[np.random.default_rng(args.seed).permutation(
            len(train_set.images))[:n]]
        guided = {} if labels is None else {"guidance": args.guidance, "classes": args.classes
                                            or "drawn as the training labels' frequencies"}
        results["samples"] = {
            "count": n, "sampler": sampler, **guided, "autocast": model.precision,
            "seconds": seconds * n / count, "classifier_test_accuracy": accuracy,
            **metrics.sample_quality(classifier, fakes[:n], real, test_set.images, args.seed,
                                     None if labels is None else labels[:n].numpy())}
    if args.fid:
        results["fid"] = {"sampler": sampler, "autocast": model.precision,
                          **fid_of(args, weights, name, fakes[:args.fid], train_set, test_set,
                                   device, progress)}
    if args.nearest:
        results["copies"] = copies(fakes[:args.nearest], train_set.images, test_set.images,
                                   classifier, nearest_png(args, path), sampler)
    return results


def fid_network(args, device):
    """(the Inception weights file, the network loaded from it), before any long work: the file
    of --fid-weights (with a warning unless it is the standard one), else the standard one from
    the cache or downloaded (fid.weights_path)."""
    path = args.fid_weights or fid.weights_path()
    network = fid.load_network(path, device)
    if args.fid_weights and not fid.standard(fid.sha256_of(path)):
        print(f"warning: {path} is not the standard FID weights {fid.WEIGHTS_FILE}; its FID is "
              "not comparable with papers'", file=sys.stderr)
    return path, network


def fid_of(args, weights, name, samples, train_set, test_set, device, progress=True):
    """{"fid", "count", "floor", "floor_count", "reference_count", "weights_sha256", "seconds"}
    for uint8 samples against the training set, with weights = (path, network); the floor is
    min(N, held-out) held-out real images against the same statistics (none for an npz: file,
    whose splits are one array)."""
    start = time.perf_counter()
    scorer = fid.Scorer(weights[0], name, train_set.images, device, progress=progress,
                        batch_size=args.fid_batch_size, net=weights[1])
    found = {"count": len(samples), "fid": scorer.score(samples),
             "reference_count": scorer.reference_count, "weights_sha256": scorer.digest,
             "standard_weights": fid.standard(scorer.digest)}
    n = min(len(samples), len(test_set.images))
    if not name.startswith("npz:") and n >= 2:
        found.update(floor=scorer.floor(test_set.images, n), floor_count=n)
    found["seconds"] = time.perf_counter() - start
    return found


def evaluate_saved(args, path, device, progress=True):
    """The FID of the saved samples at --fid-of against a dataset's training set: --dataset, or
    the dataset of the checkpoint at `path`, read as its run read it."""
    trained = checkpoint.load(path)["config"]["train"] if path else {}
    name = args.dataset or trained.get("dataset")
    cli.check(name is not None, f"{path} names no dataset (an imported model); give --dataset NAME")
    weights = fid_network(args, device)
    samples = saved_samples(args.fid_of, progress)
    cli.check(len(samples) >= 2, f"--fid-of: {args.fid_of} holds {len(samples)} image(s); FID "
              "needs at least 2")
    # A folder is read as the run read it; without the run, at the samples' side.
    folder = userdata.options_of(trained) if name == trained.get("dataset") else \
        userdata.FolderOptions(image_size=samples.shape[2])
    train_set = data.load_dataset(name, "train", args.data_dir, progress=progress, folder=folder)
    test_set = load_test_set(name, args.data_dir, progress, folder)
    if args.fid:
        samples = samples[:args.fid]
    return {"checkpoint": path, "dataset": name, "step": None, "device": str(device),
            "fid": {"samples_from": args.fid_of,
                    **fid_of(args, weights, name, samples, train_set, test_set, device,
                             progress)}}


def saved_samples(where, progress=True):
    """uint8 images [N, C, H, W] from an .npz/.npy file or a folder of images (all of one square
    size, read as a folder: dataset is, none held out)."""
    if os.path.isdir(where):
        return userdata.load_folder(where, val_fraction=0, progress=progress).train.images
    return userdata.load_labelled_npz(where).images


def load_test_set(name, data_dir, progress, folder):
    """The test split; for a folder, its held-out images, with advice evaluate.py's user can
    follow where there are none (the split was fixed when the run was trained)."""
    try:
        return data.load_dataset(name, "test", data_dir, progress=progress, folder=folder)
    except data.NothingHeldOut as e:
        raise cli.UserError(f"{e.what}; evaluate.py measures on held-out images only, and a run's "
                            "split is fixed by the --val-fraction it was trained with: train a new "
                            "run with a larger --val-fraction (train.py), or give --dataset "
                            "folder:DIR of other images of this size") from None


def outputs(args, path):
    """[(file, flag)] that this evaluation writes, checked before any work: the results (--json,
    default eval.json beside the checkpoint) and --nearest's pairs (--nearest-png, default
    nearest.png beside it)."""
    found = [(args.json or os.path.join(os.path.dirname(path), rundir.EVAL), "--json")]
    if args.nearest:
        found.append((nearest_png(args, path), "--nearest-png"))
    return found


def nearest_png(args, path):
    """Where --nearest's pairs go: --nearest-png, or nearest.png beside the checkpoint."""
    return args.nearest_png or os.path.join(os.path.dirname(path), rundir.NEAREST)


def copies(samples, train, heldout, classifier, png, sampler):
    """Does the model copy its training images? The share of samples nearer a training image
    than all but 5% of the held-out images are (about 0.05 for a model that does not copy), by L2
    in pixels and, where a classifier exists, in its features; a PNG of sample | nearest pairs,
    closest first."""
    pixels = metrics.copy_check(samples, train, heldout)
    metrics.save_nearest_pairs(png, samples, train, pixels.distances, pixels.indices)
    found = {"count": len(samples), "sampler": sampler, "heldout": len(heldout),
             "train": len(train), "png": png,
             "pixels": {"fraction": pixels.fraction, "threshold": pixels.threshold}}
    if classifier is not None:
        features = metrics.copy_check(*(metrics.embed(classifier, a)[0]
                                        for a in (samples, train, heldout)))
        found["features"] = {"fraction": features.fraction, "threshold": features.threshold}
    return found


def number(v):
    """Four decimals, or three significant digits for small values (L_T is of the order of 1e-5)."""
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


def print_table(r):
    if r.get("fid", {}).get("samples_from"):
        print(f"{r['fid']['samples_from']} (saved samples, {r['dataset']}, {r['device']})")
    else:
        step = "imported" if r["step"] is None else f"step {r['step']}"
        step += f", EMA length {r['ema_length']:g} reconstructed" if "ema_length" in r else ""
        print(f"{r['checkpoint']} ({step}, {r['dataset']}, {r['device']})")
    for part, given in (("nll", ""), ("nll_given_labels", ", each given its label")):
        if part not in r:
            continue
        n = r[part]
        unconditional = " with the null label" if "nll_given_labels" in r and not given else ""
        print(f"NLL on {n['images']} {n.get('split', 'test')} images{unconditional}{given} "
              f"({n['seconds']:.0f} s), bits/dim, mean ± s.e.:")
        for key, label in (("total", "total"), ("prior", "L_T"), ("denoising", "Σ L_{t-1}, t>=2"),
                           ("decoder", "L_0")):
            print(f"  {label:<16} {number(n[key]['mean'])} ± {number(n[key]['se'])}")
    if "samples" in r:
        s = r["samples"]
        guided = (f", classes {s['classes']} at guidance w = {s['guidance']:g}"
                  if "guidance" in s else "")
        print(f"sample quality: {s['count']} samples, {s['sampler']}{guided} ({s['seconds']:.0f} "
              f"s); features of a classifier with test accuracy "
              f"{s['classifier_test_accuracy']:.4f}")
        if "class_accuracy" in s:
            print(f"  {'classified as the class asked for':<52} {s['class_accuracy']:.3f}")
        for label, value in (
                ("FD (this classifier's features, not Inception FID)", f"{s['fd']:.3f}"),
                (f"FD of {s['count']} real training images (floor)", f"{s['fd_real_floor']:.3f}"),
                ("classified with confidence > 0.9", f"{s['confident_fraction']:.3f}"),
                (f"class-histogram entropy (max {s['class_entropy_max']:.3f}, balanced)",
                 f"{s['class_entropy']:.3f}"),
                ("precision / recall (k = 3)", f"{s['precision']:.3f} / {s['recall']:.3f}"),
                (f"precision / recall of {s['count']} real training images",
                 f"{s['precision_real']:.3f} / {s['recall_real']:.3f}")):
            print(f"  {label:<52} {value}")
    if "fid" in r:
        f = r["fid"]
        where = f", {f['sampler']}" if "sampler" in f else ""
        weights = "" if f["standard_weights"] else "; NOT the standard Inception weights"
        print(f"FID: {f['count']} samples{where} against {f['reference_count']} training images "
              f"({f['seconds']:.0f} s{weights})")
        print(f"  {'FID':<52} {f['fid']:.3f}")
        if "floor" in f:
            print(f"  {'FID of ' + str(f['floor_count']) + ' held-out real images (floor)':<52} "
                  f"{f['floor']:.3f}")
    if "copies" in r:
        c = r["copies"]
        print(f"copies: {c['count']} samples ({c['sampler']}) against {c['train']} training "
              f"images; the held-out images' 5th percentile of distance to them ({c['heldout']} "
              "images) as the threshold")
        for space in ("pixels", "features"):
            if space in c:
                print(f"  {'nearer a training image than the threshold, ' + space:<52} "
                      f"{c[space]['fraction']:.3f} (about 0.05 for a model that does not copy)")
        print(f"  sample | nearest training image pairs, closest first: {c['png']}")


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    if args.fid_of and not args.ckpt:
        path, written = None, [(args.json, "--json")] if args.json else []
    else:
        path = checkpoint.resolve(args.ckpt) if args.ckpt else checkpoint.newest()
        written = outputs(args, path)
    out = written[0][0] if written else None
    for file, flag in written:
        files.check_writable(file, flag)
    results = evaluate_saved(args, path, device) if args.fid_of else evaluate(args, path, device)
    print_table(results)
    if out:
        files.write_file(out, lambda f: f.write(json.dumps(results, indent=1).encode()))
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    cli.run_script(main)

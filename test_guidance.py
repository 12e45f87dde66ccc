"""Class-conditional training and classifier-free guidance through the scripts: guided sampling
through the real U-Net (the conditional and null halves in one call) equals two separate calls
bit for bit, with the null label the network was trained with; the null-label dropout is drawn
at the rate asked, as a function of (seed, step), so resume stays exact; a conditional model
goes to diffusers and back bit for bit; sample.py and evaluate.py ask for classes."""
import json
import os

import numpy as np
import pytest
import scipy.stats
import torch

import checkpoint
import cli
import config
import convert
import ddpm
import evaluate
import metrics
import optim
import sample
import sampling
import train
import unet

TINY = {"base_channels": 8, "norm_groups": 4, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attn_resolutions": (4,), "dropout": 0.0, "timesteps": 50, "batch_size": 8, "lr": 2e-3,
        "warmup": 2, "lr_schedule": "constant", "log_every": 2, "ckpt_every": 1000,
        "sample_every": 1000, "num_samples": 6, "sample_steps": 2, "precision": "fp32",
        "device": "cpu", "seed": 0,
        "space_to_depth": 1}  # no stem (the CPU default's), so that the model exports to diffusers


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """48 8x8 images in 3 classes (a bar at a class-dependent row), with their labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 3
    images = rng.integers(0, 40, (48, 8, 8)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 1] = 255
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def conditional_run(labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("cond")
    train.train({**TINY, "dataset": labelled, "out": str(out), "steps": 6, "class_cond": True},
                progress=False)
    return out


def randomised(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_one_batched_call_equals_two_separate_calls(w):
    """ddpm.guided_model's single network call on [x, x], [t, t], [labels, null] gives, bit for
    bit, (1 + w) ε(x, t, labels) - w ε(x, t, null) from two calls; a whole guided DDIM run too."""
    net = randomised(unet.UNet(in_channels=1, base_channels=8, channel_mult=(1, 2),
                               num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, image_size=8,
                               norm_groups=4, num_classes=3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([0, 3, 10, 25, 49])
    labels = torch.tensor([0, 1, 2, 1, 0])
    null = torch.full_like(labels, net.null_label)
    with torch.no_grad():
        batched = ddpm.guided_model(net, labels, net.null_label, w)(x, t)
        separate = (1 + w) * net(x, t, labels) - w * net(x, t, null)
    assert torch.equal(batched, separate)
    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("linear", 50))
    two_calls = lambda x_t, tt: (1 + w) * net(x_t, tt, labels) - w * net(x_t, tt, null)
    runs = [d.ddim_sample_loop(model, x.shape, steps=5, eta=1.0,
                               generator=torch.Generator().manual_seed(2))
            for model in (ddpm.guided_model(net, labels, net.null_label, w), two_calls)]
    assert torch.equal(runs[0], runs[1])


def test_the_null_label_of_sampling_is_the_one_trained_as_null(conditional_run, monkeypatch):
    """Training replaces a dropped label by the network's null index (num_classes); the model
    rebuilt from the checkpoint samples with that same index."""
    state = checkpoint.load(conditional_run)
    classes = state["config"]["net"]["num_classes"]
    assert classes == 3 and state["config"]["class_names"] == ["0", "1", "2"]
    model = checkpoint.load_model(str(conditional_run), torch.device("cpu"), "fp32")
    assert model.module.null_label == classes
    seen = []
    real = ddpm.guided_model
    monkeypatch.setattr(ddpm, "guided_model", lambda net, labels, null, w, lv=False: (
        seen.append(null), real(net, labels, null, w, lv))[1])
    sampling.generate(model.network, model.diffusion, (1, 8, 8), 3, 3, "ddim", 2, 1.0,
                      labels=torch.tensor([0, 1, 2]), guidance=2.0,
                      null_label=model.module.null_label, progress=False)
    assert seen == [classes]
    cli.run_script(sample.main, ["--ckpt", str(conditional_run), "--class", "all", "--n", "1",
                                 "--steps", "2", "--out", str(conditional_run / "s.png")])
    assert seen == [classes, classes]  # sample.py's too
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    opts = config.Train(seed=0, batch_size=4, class_cond=True, cond_drop=1.0, hflip=False)
    cfg = config.Config({"num_classes": 3}, {}, "linear", 10, opts)
    run = type("Run", (), dict(cfg=cfg, world=1, rank=0, device="cpu",
                               data=train.Data(images, torch.tensor([0, 1, 2, 0]),
                                               optim.Batches(4, 4, 0, "cpu")),
                               diffusion=ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 10))))
    _, y, _, _ = train.draw_batch(run, 0)
    assert y.tolist() == [classes] * 4


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_label_dropout_is_drawn_at_the_rate_asked(rate):
    """Over 300 steps of 64 labels, the share replaced by the null label agrees with --cond-drop
    (a two-sided binomial test); the draws of a step repeat, and differ from step to step."""
    cfg = config.Train(seed=0, batch_size=64, cond_drop=rate)
    drops = torch.stack([optim.step_label_drops(cfg, s, "cpu") for s in range(300)])
    assert scipy.stats.binomtest(int(drops.sum()), drops.numel(), rate).pvalue > 1e-3
    assert torch.equal(drops[7], optim.step_label_drops(cfg, 7, "cpu"))
    assert not torch.equal(drops[7], drops[8])


def test_label_dropout_is_independent_of_the_flips():
    """The drops have a stream of their own: over 300 steps of 64 images, the share both
    dropped and flipped agrees with 0.3 x 0.5 (a two-sided binomial test); drawn on the flips'
    stream, every drop would be a flip."""
    cfg = config.Train(seed=0, batch_size=64, cond_drop=0.3, hflip=True)
    drops = torch.stack([optim.step_label_drops(cfg, s, "cpu") for s in range(300)])
    flips = torch.stack([optim.step_flips(cfg, s, "cpu") for s in range(300)])
    assert scipy.stats.binomtest(int((drops & flips).sum()), drops.numel(), 0.15).pvalue > 1e-3


def test_two_processes_draw_one_process_s_labels_and_drops():
    """train.draw_batch at --cond-drop 0.3 in two processes: each keeps its half of the global
    batch's labels and drops, so that together they are exactly the draw of one process; every
    label is the image's own or the null label, and about 30% are null."""
    labels = torch.arange(64) % 3

    def run(rank, world):
        opts = config.Train(seed=0, batch_size=64, class_cond=True, cond_drop=0.3, hflip=False)
        cfg = config.Config({"num_classes": 3}, {}, "linear", 10, opts)
        return type("Run", (), dict(cfg=cfg, world=world, rank=rank, device="cpu",
                                    data=train.Data(torch.zeros(64, 1, 2, 2, dtype=torch.uint8),
                                                    labels, optim.Batches(64, 64, 0, "cpu")),
                                    diffusion=ddpm.GaussianDiffusion(
                                        ddpm.make_beta_schedule("cosine", 10))))
    one, nulls = run(0, 1), 0
    for step in range(60):
        y = train.draw_batch(one, step)[1]
        halves = [train.draw_batch(run(rank, 2), step)[1] for rank in (0, 1)]
        assert [len(h) for h in halves] == [32, 32] and torch.equal(torch.cat(halves), y)
        own = labels[one.data.batches.indices(step)]
        assert bool(((y == own) | (y == 3)).all())
        nulls += int((y == 3).sum())
    assert scipy.stats.binomtest(nulls, 60 * 64, 0.3).pvalue > 1e-3


def test_a_conditional_run_resumes_bit_exactly(labelled, tmp_path):
    given = {**TINY, "dataset": labelled, "class_cond": True, "cond_drop": 0.3}
    train.train({**given, "out": str(tmp_path / "a"), "steps": 8}, progress=False)
    train.train({**given, "out": str(tmp_path / "b"), "steps": 4}, progress=False)
    train.train({**given, "out": str(tmp_path / "b"), "steps": 8, "resume": True}, progress=False)
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert any(not torch.equal(v, torch.zeros_like(v))
               for k, v in a["model"].items() if k.startswith("class_emb"))


def test_a_conditional_model_goes_to_diffusers_and_back_bit_for_bit(conditional_run, tmp_path):
    pytest.importorskip("diffusers")
    cli.run_script(convert.main, ["--to-diffusers", str(conditional_run), "--out",
                                  str(tmp_path / "pipe")])
    with open(tmp_path / "pipe" / "unet" / "config.json") as f:
        assert json.load(f)["num_class_embeds"] == 4  # 3 classes and the null label
    cli.run_script(convert.main, ["--from-diffusers", str(tmp_path / "pipe"), "--out",
                                  str(tmp_path / "back.pt")])
    before, after = checkpoint.load(conditional_run), checkpoint.load(tmp_path / "back.pt")
    assert after["config"]["net"]["num_classes"] == 3
    assert before["ema"].keys() == after["ema"].keys()
    assert all(torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])


def test_sample_asks_for_classes(conditional_run, tmp_path, capsys):
    """--class all: one row per class, --n each; --class 2: --n images of class 2; no --class:
    classes drawn from the seed, sorted, stored beside the images in an .npz."""
    from PIL import Image
    common = ["--ckpt", str(conditional_run), "--steps", "2", "--guidance", "2"]
    cli.run_script(sample.main, [*common, "--class", "all", "--n", "2", "--out",
                                 str(tmp_path / "all.png")])
    with Image.open(tmp_path / "all.png") as grid:
        assert grid.size == (2 * 10 + 2, 3 * 10 + 2)  # 2 per row, 3 rows of 8x8 images
    cli.run_script(sample.main, [*common, "--class", "2", "--n", "3", "--out",
                                 str(tmp_path / "two.npz")])
    two = np.load(tmp_path / "two.npz")
    assert two["images"].shape == (3, 8, 8) and two["labels"].tolist() == [2, 2, 2]
    cli.run_script(sample.main, [*common, "--n", "9", "--out", str(tmp_path / "drawn.npz")])
    drawn = np.load(tmp_path / "drawn.npz")["labels"]
    assert len(drawn) == 9 and list(drawn) == sorted(drawn) and set(drawn) <= {0, 1, 2}
    assert "guidance w = 2" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--class", "3"], "--class '3' is not one of the model's 3 classes (0-2: 0, 1, 2)"),
    (["--class", "cat"], "--class 'cat' is not one of the model's 3 classes"),
    (["--guidance", "nan"], "--guidance must be a finite number in [0, 1000], got nan"),
    (["--guidance=-1"], "--guidance must be a finite number in [0, 1000], got -1.0"),
    # class lists as a user may type them: digits that str.isdigit() takes and int() does not
    (["--class", "²"], "--class '²' is not one of the model's 3 classes"),
    (["--class", "1,²"], "--class '²' is not one of the model's 3 classes"),
    (["--class", "١"], "--class '١' is not one of the model's 3 classes"),
    (["--class", "1,,2"], "--class '' is not one of the model's 3 classes"),
    (["--class", "all,1"], "--class 'all' is not one of the model's 3 classes"),
    (["--class", "-1"], "--class '-1' is not one of the model's 3 classes"),
    (["--class", "1.0"], "--class '1.0' is not one of the model's 3 classes"),
    (["--class", "99999999999999999999999"], "--class '99999999999999999999999' is not one"),
])
@pytest.mark.parametrize("script", ["sample", "evaluate"])
def test_bad_classes_and_guidance_are_one_line(conditional_run, tmp_path, capsys, argv, needle,
                                               script):
    """sample.py and evaluate.py: one line and exit status 2, nothing written."""
    capsys.readouterr()
    out = ["--out", str(tmp_path / "x.png")] if script == "sample" else \
        ["--json", str(tmp_path / "x.json"), "--n", "0", "--samples", "4"]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_script({"sample": sample.main, "evaluate": evaluate.main}[script],
                       ["--ckpt", str(conditional_run), *out, *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not os.listdir(tmp_path)


def test_class_names_that_do_not_fit_the_network_are_not_used(conditional_run, tmp_path, capsys):
    """A checkpoint whose class_names has 4 names for a network of 3 classes (a run resumed on
    changed classes before that was refused): the 4th name is not taken for the null label;
    --class asks by the network's indices, and all draws one row per class it has."""
    state = checkpoint.load(conditional_run)
    state["config"]["class_names"] = ["a", "aa", "b", "c"]
    torch.save(state, tmp_path / "odd.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run_script(sample.main, ["--ckpt", str(tmp_path / "odd.pt"), "--class", "c",
                                     "--out", str(tmp_path / "x.npz")])
    assert "--class 'c' is not one of the model's 3 classes (0-2: 0, 1, 2)" in \
        capsys.readouterr().err
    cli.run_script(sample.main, ["--ckpt", str(tmp_path / "odd.pt"), "--class", "all", "--n", "1",
                                 "--steps", "2", "--out", str(tmp_path / "all.npz")])
    assert np.load(tmp_path / "all.npz")["labels"].tolist() == [0, 1, 2]


def test_class_cond_needs_labels_and_class_needs_a_conditional_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "plain.npz", images=rng.integers(0, 256, (16, 8, 8), dtype=np.uint8))
    with pytest.raises(cli.UserError, match="--class-cond needs labels, and npz:.* has none; "
                                            "labels come with mnist"):
        train.train({**TINY, "dataset": f"npz:{tmp_path / 'plain.npz'}", "out": str(tmp_path / "r"),
                     "steps": 2, "class_cond": True}, progress=False)
    train.train({**TINY, "dataset": f"npz:{tmp_path / 'plain.npz'}", "out": str(tmp_path / "u"),
                 "steps": 2}, progress=False)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.run_script(sample.main, ["--ckpt", str(tmp_path / "u"), "--class", "1", "--out",
                                     str(tmp_path / "x.png")])
    assert "this model is not class-conditional" in capsys.readouterr().err


def test_evaluate_scores_the_class_asked_for(tmp_path, monkeypatch):
    """On labelled 28x28 data: with --class all, as many samples of each class, and the share
    the classifier assigns to the class asked beside the other scores. Train.py's grid and score
    are unguided (the classes drawn as the training labels have them); evaluate.py guides with
    the null label the network was trained with (num_classes). With
    known-answer stand-ins for the sampler: one that always draws the class asked scores a class
    accuracy near 1, one that draws the next class near 0; one that returns training images is
    found to copy (in pixels and in the classifier's features), one that draws new images of the
    same kind is not."""
    import data
    import test_evaluate
    sets = {"train": test_evaluate.synthetic_digits(320, 0), "test": test_evaluate.synthetic_digits(100, 1)}
    monkeypatch.setattr(data, "load_dataset", lambda name, split="train", *a, **k: sets[split])
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    nulls, real_guided = [], ddpm.guided_model
    monkeypatch.setattr(ddpm, "guided_model", lambda net, labels, null, w, lv=False: (
        nulls.append(null), real_guided(net, labels, null, w, lv))[1])
    train.train({**TINY, "dataset": "mnist", "attn_resolutions": (14,), "steps": 2,
                 "out": str(tmp_path / "run"), "class_cond": True, "eval_every": 2,
                 "eval_samples": 10}, progress=False)
    assert nulls == []  # the score at step 2 and the final grid are unguided (w = 0)
    with open(tmp_path / "run" / "log.jsonl") as f:
        scores = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    assert [r["guidance"] for r in scores] == [0.0]
    evaluate_args = ["--ckpt", str(tmp_path / "run"), "--n", "0", "--samples", "20",
                     "--steps", "2", "--class", "all", "--guidance", "1",
                     "--json", str(tmp_path / "e.json")]
    cli.run_script(evaluate.main, evaluate_args)
    assert nulls and set(nulls) == {10}
    with open(tmp_path / "e.json") as f:
        s = json.load(f)["samples"]
    assert s["count"] == 20 and s["guidance"] == 1 and s["classes"] == "all"
    assert 0 <= s["class_accuracy"] <= 1 and "fd" in s

    # Without --class: the classes drawn as the training labels have them (the run stored their
    # counts), unguided; the bound twice, with the null label and with each image's label.
    ckpt = checkpoint.load_model(str(tmp_path / "run"), torch.device("cpu"))
    assert ckpt.config["class_counts"] == np.bincount(sets["train"].labels, minlength=10).tolist()
    nulls.clear()
    cli.run_script(evaluate.main, ["--ckpt", str(tmp_path / "run"), "--n", "4", "--samples", "20",
                                   "--steps", "2", "--json", str(tmp_path / "d.json")])
    assert nulls == []
    with open(tmp_path / "d.json") as f:
        d = json.load(f)
    assert d["samples"]["guidance"] == 0 and d["samples"]["count"] == 20
    assert d["nll"]["images"] == d["nll_given_labels"]["images"] == 4
    assert np.isfinite(d["nll"]["total"]["mean"]) and np.isfinite(d["nll_given_labels"]["total"]["mean"])

    def stand_in(draw):
        def generate(network, diffusion, shape, count, *args, labels=None, **kwargs):
            drawn[:] = [draw(count, labels), labels]
            return torch.from_numpy(drawn[0]).float() / 127.5 - 1, None
        return generate

    test, drawn = sets["test"], []
    classifier, _ = metrics.classifier_for("mnist", sets["train"], test, torch.device("cpu"),
                                           progress=False)  # the one evaluate.py trained
    of_class = lambda k: test.images[test.labels == k]
    for shift in (0, 1):  # the class asked; the next one
        monkeypatch.setattr(sampling, "generate", stand_in(lambda count, labels: np.stack(
            [of_class((int(k) + shift) % 10)[i % len(of_class((int(k) + shift) % 10))]
             for i, k in enumerate(labels)])))
        cli.run_script(evaluate.main, evaluate_args)
        with open(tmp_path / "e.json") as f:
            got = json.load(f)["samples"]["class_accuracy"]
        # what the classifier says of those images, against the classes asked
        predicted = metrics.embed(classifier, drawn[0])[1].argmax(1)
        assert got == pytest.approx(np.mean(predicted == drawn[1].numpy()))
        assert got >= 0.6 if shift == 0 else got <= 0.2
    new = test_evaluate.synthetic_digits(40, 7).images
    for images, copying in ((sets["train"].images[:40], True), (new, False)):
        monkeypatch.setattr(sampling, "generate", stand_in(lambda count, labels: images[:count]))
        cli.run_script(evaluate.main, [*evaluate_args[:5], "0", "--nearest", "40", "--class",
                                       "all", "--json", str(tmp_path / "e.json")])
        with open(tmp_path / "e.json") as f:
            c = json.load(f)["copies"]
        for space in ("pixels", "features"):
            assert (c[space]["fraction"] >= 0.95) if copying else (c[space]["fraction"] <= 0.3), \
                (space, copying, c)


@pytest.mark.parametrize("flags, classes, expected", [
    ({}, 10, True),                                    # the cpu recipe on labelled data
    ({"recipe": "ho"}, 10, False),                     # Ho et al.'s: unconditional
    ({}, None, False),                                 # no labels: unconditional
    ({"class_cond": False}, 10, False),                # --no-class-cond
    ({"recipe": "ho", "class_cond": True}, 10, True),  # --class-cond with any recipe
])
def test_the_cpu_recipe_trains_with_labels_where_the_data_has_them(flags, classes, expected):
    cfg = config.automatic({"dataset": "mnist", **flags}, torch.device("cpu"), (1, 28, 28),
                           classes)
    assert cfg.train.class_cond is expected
    assert cfg.net.get("num_classes") == (classes if expected else None)


def test_class_cond_asked_for_on_data_without_labels_is_one_line():
    with pytest.raises(cli.UserError, match="--class-cond needs labels"):
        config.automatic({"dataset": "npz:x.npz", "class_cond": True}, torch.device("cpu"),
                         (1, 28, 28), None)


def test_the_bound_given_labels_hands_each_batch_its_images_labels():
    """evaluate.nll_bits_per_dim with labels: every network call of a batch gets that batch's
    labels (5 images in batches of 2: [3, 1], [4, 1], [5]); without labels, none."""
    seen = []

    def network(x, t, y=None):
        seen.append(None if y is None else y.tolist())
        return torch.zeros_like(x)

    d = ddpm.GaussianDiffusion(ddpm.make_beta_schedule("cosine", 4))
    images = np.zeros((5, 1, 2, 2), dtype=np.uint8)
    evaluate.nll_bits_per_dim(network, d, images, 2, progress=False, labels=np.array([3, 1, 4, 1, 5]))
    assert seen == [[3, 1]] * 4 + [[4, 1]] * 4 + [[5]] * 4
    seen.clear()
    evaluate.nll_bits_per_dim(network, d, images, 2, progress=False)
    assert seen == [None] * 12

"""Training, featurizing and evaluating on tiny generated data, through the package API."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import REPO, TRAIN_KEYS, params, tiny_overrides, write_params

from transfer_study.core import paths, timing
from transfer_study.core.config import OPTIMIZERS
from transfer_study.core.params_file import deep_merge
from transfer_study.core.stage import UserError
from transfer_study.data.readers import read_cifar10
from transfer_study.data.splits import load_split, make_splits, save_split
from transfer_study.evaluate import evaluate_models
from transfer_study.inference import predict_logits
from transfer_study.nn.build import build_net, check_trainable, load_trained
from transfer_study.train.fit import train_model
from transfer_study.train.module import Classifier
from transfer_study.train.optim import optimizer_class

STATS = {"shape": [3, 32, 32], "mean": (0.5,) * 3, "std": (0.25,) * 3}  # what build_net needs


def test_mlp_learns_and_writes_its_outputs(study):
    metrics = study.metrics["mlp"]  # what train_model returned, 4 epochs with patience 4
    assert study.params.model("mlp").train.max_epochs == 4
    assert TRAIN_KEYS <= metrics.keys()
    assert metrics["epochs"] == 4 and metrics["kept_val_accuracy"] > 0.5  # chance is 0.1
    assert json.loads(paths.train_metrics("mlp").read_text()) == metrics
    history = pd.read_csv(paths.history_file("mlp"))
    assert list(history.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert history["epoch"].tolist() == [1, 2, 3, 4]


def test_early_stopping_on_val_loss(workdir, archive):
    # No decrease can reach min_delta: epoch 1 sets the best, epoch 2 exhausts patience 1.
    metrics = train_model(
        "mlp", params(archive, train={"max_epochs": 30, "patience": 1, "min_delta": 100.0})
    )
    assert metrics["epochs"] == 2


def test_the_study_timer_sees_the_first_batch_and_counts_the_train_images(
    workdir, archive, monkeypatch
):
    record = {"images": 0}  # core.timing's, for this run alone
    monkeypatch.setattr(timing, "_record", record)
    metrics = train_model("mlp", params(archive, train={"max_epochs": 2, "patience": 2}))
    train_images = len(load_split(paths.split_file("train")).labels)
    assert record["images"] == metrics["epochs"] * train_images
    assert "work_start" in record


class ReadsLiveSummary(pl.Callback):
    """After LiveProgress (train_model's callbacks come after it): the summary dvc exp show
    reads at each epoch's end."""

    def __init__(self):
        self.texts = []

    def on_train_epoch_end(self, trainer, module):
        self.texts.append(paths.live_summary("mlp").read_text())


def test_divergence_is_reported(workdir, archive):
    live = ReadsLiveSummary()
    with pytest.raises(UserError, match="mlp: val_loss was never finite; lower mlp.train.lr"):
        train_model("mlp", params(archive, train={"lr": 1e6, "optimizer": "sgd"}), [live])
    # The live summary holds no NaN while it runs, as a number or as DVCLive's string "nan";
    # the refused run leaves none behind (there was none before it).
    for text in live.texts:
        assert "loss" not in json.loads(text, parse_constant=pytest.fail).get("val", {})
    assert live.texts and not paths.live_dir("mlp").exists()


def test_saved_model_reproduces_the_trained_network(study):
    net, section, config = load_trained(paths.model_file("mlp"))
    assert config["section"]["train"]["lr"] == 0.001 and section.hidden == (256, 64)
    saved = torch.load(paths.model_file("mlp"), weights_only=True)
    assert set(saved["state_dict"]) == set(net.state_dict())


def test_model_saved_before_the_newer_keys_still_loads(study):
    path = paths.model_file("mlp")
    saved = torch.load(path, weights_only=True)
    section = saved["config"]["section"]
    for key in ("norm", "residual"):
        del section[key]
    for key in ("warmup_epochs", "label_smoothing"):
        del section["train"][key]
    torch.save(saved, path)
    net, loaded, _ = load_trained(path)
    assert (loaded.norm, loaded.residual, loaded.train.warmup_epochs) == ("none", False, 0)
    assert set(net.state_dict()) == set(saved["state_dict"])


def test_frozen_backbone_featurize_train_evaluate(study):
    # The study featurized VGG16's train split (120 images) and trained its head and the MLP.
    features = np.load(paths.features_file("vgg16", "train"))
    assert len(load_split(paths.split_file("train")).labels) == 120
    assert features.shape == (120, 25088) and features.dtype == np.float16
    metrics = study.metrics["vgg16"]
    assert metrics["trainable_params"] < metrics["total_params"]
    results = evaluate_models(["mlp", "vgg16"])
    assert set(results) == {"mlp", "vgg16"}
    for name in results:
        assert 0 <= results[name]["test_accuracy"] <= 1 and results[name]["test_loss"] > 0
        predictions = pd.read_csv(paths.predictions_file(name))
        assert len(predictions) == 50 and list(predictions.columns[:2]) == ["actual", "predicted"]
    assert json.loads(paths.EVALUATE_METRICS.read_text()) == results
    # Only the models evaluated have predictions: a left-out model's old table is gone.
    evaluate_models(["mlp"])
    assert sorted(p.name for p in paths.PREDICTIONS_DIR.iterdir()) == ["mlp.csv"]


TORCH_OPTIMIZERS = {  # written out, not looked up: a wrong entry in params.OPTIMIZERS fails
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_and_lr_reach_torch(optimizer, archive):
    section = params(archive, mlp={"train": {"optimizer": optimizer, "lr": "1e-4"}}).model("mlp")
    module = Classifier(build_net("mlp", section, 10, STATS), section.train, 10)
    built = module.configure_optimizers()
    assert type(built) is TORCH_OPTIMIZERS[optimizer] is optimizer_class(optimizer)
    assert built.param_groups[0]["lr"] == 0.0001


def lr_by_step(section, steps_per_epoch, steps):
    """The lr of each of the first `steps` optimizer steps, as Lightning drives the schedule."""
    module = Classifier(build_net("mlp", section, 10, STATS), section.train, 10)
    total = steps_per_epoch * section.train.max_epochs
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=total, max_epochs=section.train.max_epochs
    )
    built = module.configure_optimizers()
    assert built["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_exponential_schedule_decays_once_per_epoch(archive):
    train = {"scheduler": "exponential", "gamma": 0.5, "lr": 0.1}
    lrs = lr_by_step(params(archive, train=train).model("mlp"), steps_per_epoch=4, steps=12)
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)


def test_warmup_then_cosine_reaches_zero_at_max_epochs(archive):
    train = {"scheduler": "cosine", "warmup_epochs": 2, "max_epochs": 10, "lr": 0.1}
    lrs = lr_by_step(params(archive, train=train).model("mlp"), steps_per_epoch=5, steps=50)
    # Linear from lr/10 to lr over the 10 warm-up steps, then a half cosine down to ~0.
    assert lrs[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[30] == pytest.approx(0.05)  # halfway through the 40 cosine steps
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001


def test_fractional_warmup_never_exceeds_the_lr(archive):
    train = {"warmup_epochs": 0.5, "lr": 0.3}  # 2.5 steps of 5 per epoch: 3 whole steps
    lrs = lr_by_step(params(archive, train=train).model("mlp"), steps_per_epoch=5, steps=8)
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])


def test_exponential_decay_counts_from_the_end_of_the_warmup(archive):
    train = {"scheduler": "exponential", "gamma": 0.5, "warmup_epochs": 1, "lr": 0.4}
    lrs = lr_by_step(params(archive, train=train).model("mlp"), steps_per_epoch=4, steps=12)
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4] + [0.4] * 4 + [0.2] * 4)


def test_no_schedule_keeps_the_bare_optimizer(archive):
    section = params(archive).model("mlp")
    built = Classifier(build_net("mlp", section, 10, STATS), section.train, 10)
    assert isinstance(built.configure_optimizers(), torch.optim.Adam)


def test_label_smoothing_reaches_the_train_loss_only(archive):
    section = params(archive, train={"label_smoothing": 0.2}).model("mlp")
    module = Classifier(build_net("mlp", section, 10, STATS), section.train, 10).eval()
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    logits = module.net(batch[0]).float()
    train, val = module._step(batch, "train"), module._step(batch, "val")
    torch.testing.assert_close(train, F.cross_entropy(logits, batch[1], label_smoothing=0.2))
    torch.testing.assert_close(val, F.cross_entropy(logits, batch[1]))
    assert not torch.isclose(train, val)


@pytest.mark.parametrize("pixels", [True, False])
def test_mixup_blends_train_rows_and_their_targets_only_in_training(archive, pixels):
    section = params(archive, train={"mixup": 0.4, "label_smoothing": 0.1}).model("mlp")
    net = build_net("mlp", section, 10, STATS)
    module = Classifier(net if pixels else net[2], section.train, 10, pixels=pixels).eval()
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    shape = (8, 3, 32, 32) if pixels else (8, 3072)  # images, or rows of cached features
    inputs = torch.randint(0, 256, shape, dtype=torch.uint8 if pixels else torch.float16)
    labels = torch.arange(8)  # eight classes: each row's own label differs from its partner's
    module._trainer = SimpleNamespace(training=False)
    assert module.on_after_batch_transfer((inputs, labels), 0)[1] is labels
    module._trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    mixed, targets = module.on_after_batch_transfer((inputs, labels), 0)
    share = targets[0, 0].item()  # one Beta(0.4, 0.4) weight for the whole batch
    assert 0 < share < 1 and share != 0.5
    partner = labels.roll(1)  # each row is blended with the one before it
    expected = share * F.one_hot(labels, 10) + (1 - share) * F.one_hot(partner, 10)
    torch.testing.assert_close(targets, expected.float())
    torch.testing.assert_close(
        mixed, share * inputs.float() + (1 - share) * inputs.float().roll(1, 0)
    )
    logits = module.net(mixed).float()
    torch.testing.assert_close(
        module._step((mixed, targets), "train"),
        F.cross_entropy(logits, targets, label_smoothing=0.1),
    )
    assert module.train_acc.compute() == (logits.argmax(1) == targets.argmax(1)).float().mean()


def test_batch_larger_than_train_split_is_refused(workdir, archive):
    with pytest.raises(UserError, match="mlp.train.batch_size = 512 is larger than the train"):
        train_model("mlp", params(archive, train={"batch_size": 512}))


def test_a_network_too_big_for_memory_is_refused_before_allocating(workdir, archive):
    # 3,072 inputs x 10^8 units: 1.2 TB of float32 weights, which torch would try to allocate.
    huge = {"mlp": {"hidden": [100_000_000]}}
    with pytest.raises(UserError) as error:
        train_model("mlp", params(archive, **huge))
    assert str(error.value).startswith(
        "mlp.hidden = [100000000]: a network of 308,300,000,010 parameters needs 4,594.0 GiB"
    )
    stats = {"shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.2] * 3}
    head = params(archive, vgg16={"head": {"hidden": [10**9, 10]}}).model("vgg16")
    with pytest.raises(UserError, match=r"vgg16.head.hidden = \[1000000000, 10\]: a network of"):
        check_trainable("vgg16", head, 10, stats, 512, memory_bytes=2**30)
    check_trainable("vgg16", params(archive).model("vgg16"), 10, stats, 512, memory_bytes=2**30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_asked_without_gpu(workdir, archive):
    with pytest.raises(UserError, match="no CUDA device is visible"):
        train_model("mlp", params(archive, train={"accelerator": "gpu"}))


@pytest.mark.parametrize(("name", "size"), [("vgg16", 32), ("inception", 75)])
def test_fine_tuning_trains_the_whole_network(archive, tmp_path, monkeypatch, name, size):
    # The smallest split with every class in each part: a whole backbone passes over 50 images.
    monkeypatch.chdir(tmp_path)
    train, test = read_cifar10(archive)
    for split_name, split in make_splits(train, test, 0.2, 0, 50, 10).items():
        save_split(split, paths.split_file(split_name))
    p = params(
        archive,
        train={"max_epochs": 1, "batch_size": 20},
        **{name: {"trainable_layers": "all", "image_size": size}},
    )
    metrics = train_model(name, p)
    assert metrics["trainable_params"] == metrics["total_params"] > 1_000_000
    results = evaluate_models([name])  # from images: no features were cached
    assert not paths.features_file(name, "test").exists()
    assert 0 <= results[name]["test_accuracy"] <= 1


def test_featurize_halves_the_batch_on_out_of_memory(tmp_path, capsys):
    from transfer_study.featurize import BATCH_SIZE, featurize

    calls = []

    def extractor(batch):  # fails like a full GPU whenever a batch holds more than 8 images
        calls.append(len(batch))
        if len(batch) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return batch.float().mean(dim=(2, 3))

    images = np.random.default_rng(0).integers(0, 256, (40, 3, 4, 4), dtype=np.uint8)
    featurize(extractor, images, tmp_path / "f.npy", 3, torch.device("cpu"), desc="t")
    assert calls[:3] == [BATCH_SIZE["cpu"], BATCH_SIZE["cpu"] // 2, 8] and set(calls[3:]) == {8}
    expected = images.astype(np.float32).mean(axis=(2, 3)).astype(np.float16)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), expected)
    assert "retrying with batches of 8" in capsys.readouterr().err


def test_loader_shards_by_rank_and_reshuffles_by_epoch():
    from transfer_study.train.loaders import make_loader

    inputs, labels = torch.arange(20).float()[:, None], torch.arange(20)

    def order(rank, world, epoch):
        loader = make_loader(inputs, labels, 4, shuffle=True, rank=rank, world_size=world)
        loader.sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert sorted(order(0, 1, 0)) == list(range(20))
    assert order(0, 1, 0) != order(0, 1, 1)
    shards = order(0, 2, 0), order(1, 2, 0)
    assert sorted(shards[0] + shards[1]) == list(range(20))


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_with_two_cpu_processes(workdir, archive, strategy):
    ddp = {"train": {"accelerator": "cpu", "devices": 2, "strategy": strategy, "max_epochs": 2}}
    write_params(workdir / "params.yaml", deep_merge(tiny_overrides(archive), ddp))
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src"}
    result = subprocess.run(
        [sys.executable, f"{REPO}/stages/train.py", "mlp"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(paths.train_metrics("mlp").read_text())
    assert TRAIN_KEYS <= metrics.keys() and metrics["epochs"] == 2
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    # The headline summary comes from the launching process, whichever process trained.
    summary = json.loads(paths.live_summary("mlp").read_text())
    assert summary["epochs"] == 2 and summary["step"] == metrics["kept_epoch"]


def test_featurize_caches_mirrored_train_features(study):
    from transfer_study.core.paths import FLIPPED_TRAIN
    from transfer_study.featurize import featurize
    from transfer_study.inference import prepare_extractor
    from transfer_study.nn.backbones import feature_extractor

    # The study ran featurize_model("vgg16", section, hflip=True).
    plain = np.load(paths.features_file("vgg16", "train"))
    flipped = np.load(paths.features_file("vgg16", FLIPPED_TRAIN))
    assert flipped.shape == plain.shape and not np.array_equal(flipped, plain)
    # Flipping on the device gives what featurizing mirrored images gives.
    images = load_split(paths.split_file("train")).images
    extractor = prepare_extractor(feature_extractor("vgg16", "none", 32), torch.device("cpu"))
    featurize(extractor, images, study.root / "a.npy", 25088, torch.device("cpu"), flip=True)
    featurize(
        extractor,
        np.ascontiguousarray(images[..., ::-1]),
        study.root / "b.npy",
        25088,
        torch.device("cpu"),
    )
    np.testing.assert_array_equal(np.load(study.root / "a.npy"), np.load(study.root / "b.npy"))
    assert train_model("vgg16", study.params_with(train={"hflip": True}))["epochs"] == 2


def test_hflip_on_features_picks_plain_or_mirrored_per_sample():
    from transfer_study.train.loaders import make_loader

    plain, mirrored = torch.zeros(64, 3), torch.ones(64, 3)
    loader = make_loader(plain, torch.arange(64), 64, shuffle=False, flipped=mirrored)
    ((inputs, _),) = list(loader)
    rows = inputs[:, 0]
    assert set(rows.tolist()) == {0.0, 1.0}  # both, chosen per sample
    assert torch.equal(inputs, rows[:, None].expand(-1, 3))  # whole rows, not mixed features


def test_hflip_on_pixels_flips_only_in_training(archive):
    section = params(archive, train={"hflip": True}).model("mlp")
    module = Classifier(build_net("mlp", section, 10, STATS), section.train, 10, pixels=True)
    images = torch.arange(2 * 64 * 3 * 4, dtype=torch.float32).reshape(128, 3, 2, 2)
    for training in (False, True):
        module._trainer = type("Trainer", (), {"training": training})()
        out, _ = module.on_after_batch_transfer((images, torch.zeros(128)), 0)
        flipped = (out == images.flip(-1)).flatten(1).all(1)
        unchanged = (out == images).flatten(1).all(1)
        assert bool((flipped | unchanged).all())
        assert flipped.any() == training and unchanged.any()


def test_crop_shifts_train_images_only(archive):
    section = params(archive, mlp={"train": {"crop": 2}}).model("mlp")
    module = Classifier(build_net("mlp", section, 10, STATS), section.train, 10, pixels=True)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding shows
    module._trainer = type("Trainer", (), {"training": False})()
    assert torch.equal(module.on_after_batch_transfer((images, None), 0)[0], images)
    module._trainer = type("Trainer", (), {"training": True})()
    out, _ = module.on_after_batch_transfer((images, None), 0)
    assert out.shape == images.shape and out.dtype == torch.uint8
    shifted = 0
    for original, cropped in zip(images, out):
        # Some window of the zero-padded image, offsets -2..2 in each direction, is the crop.
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        windows = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        match = [i for i, w in enumerate(windows) if torch.equal(w, cropped)]
        assert len(match) == 1
        shifted += match[0] != 12  # window 12 is the unshifted image
    assert shifted > 40  # 24 of 25 offsets shift: most of 64 images moved


def test_hflip_needs_the_mirrored_cache(study):
    p = study.params_with(vgg16={"train": {"hflip": True}})
    # As featurize_model("vgg16", section, hflip=False) leaves it: no mirrored train features.
    paths.features_file("vgg16", paths.FLIPPED_TRAIN).unlink()
    with pytest.raises(UserError, match="set the shared train.hflip: true"):
        train_model("vgg16", p)


@pytest.mark.slow  # two processes
def test_featurize_under_torchrun_matches_one_process(study):
    # The study's features, of one process (featurize_model, which the stage runs), to match.
    splits = ("train", "val", "test")
    single = {s: np.load(paths.features_file("vgg16", s)) for s in splits}
    write_params(study.root / "params.yaml", tiny_overrides(study.archive))
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src"}
    stage = [f"{REPO}/stages/featurize.py", "vgg16"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, *stage], cwd=study.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for split in splits:  # each rank ran its own half; rank 0 joined them in order
        joined = np.load(paths.features_file("vgg16", split)).astype(np.float32)
        np.testing.assert_allclose(joined, single[split].astype(np.float32), rtol=2e-2, atol=2e-2)
    assert not list(paths.features_file("vgg16", "train").parent.glob("*part*"))
    assert json.loads((paths.METRICS_DIR / "featurize_vgg16.json").read_text())["device"] == (
        "2 x cpu"
    )


def test_compile_param_compiles_the_trained_network(workdir, archive, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    train_model("mlp", params(archive, train={"compile": True, "max_epochs": 1}))
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Sequential)
    train_model("mlp", params(archive, train={"compile": False, "max_epochs": 1}))
    assert len(compiled) == 1


def test_dvclive_logs_each_epoch_and_summarizes_the_kept_one(workdir, archive, capsys):
    # A high lr makes val loss wander, so the kept epoch is rarely the last.
    p = params(archive, train={"max_epochs": 8, "patience": 3, "lr": 0.05})
    metrics = train_model("mlp", p)
    history = pd.read_csv(paths.history_file("mlp"))
    # stdout is not a terminal under pytest: one line an epoch on stderr, as in a log file.
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert len(lines) == len(history)
    last = history.iloc[-1]
    assert lines[-1].startswith(f"mlp: epoch {len(history)}/8: train/loss {last['train_loss']:.4f}")
    assert f"val/acc {last['val_acc']:.2%}" in lines[-1]
    kept = history.loc[history["val_loss"].idxmin()]
    summary = json.loads(paths.live_summary("mlp").read_text())
    assert summary == {
        "step": int(kept["epoch"]),
        "val": {"loss": pytest.approx(kept["val_loss"]), "acc": pytest.approx(kept["val_acc"])},
        "epochs": len(history),
        "train_seconds": metrics["train_seconds"],
    }
    curve = pd.read_csv(paths.live_dir("mlp") / "plots/metrics/val/loss.tsv", sep="\t")
    assert curve["step"].tolist() == history["epoch"].tolist()  # one row per epoch, 1-based
    np.testing.assert_allclose(curve["loss"], history["val_loss"], rtol=1e-6)
    # The model file holds the kept epoch's weights: its val loss is the summary's.
    net, section, _ = load_trained(paths.model_file("mlp"))
    val = load_split(paths.split_file("val"))
    logits = predict_logits(net, val.images)
    loss = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(val.labels)))
    assert loss == pytest.approx(summary["val"]["loss"], rel=1e-4)


def test_test_time_flips_average_image_and_mirror(study):
    from transfer_study.evaluate import logits_on_test

    # The study featurized VGG16 (mirrored test images too) and trained it and the MLP.
    test = load_split(paths.split_file("test"))
    averaged = evaluate_models(["mlp", "vgg16"], hflip=True)
    # The MLP's averaged probabilities are those of the images and of their mirror images
    # (flipped along the width, as featurize flips them).
    net, _, _ = load_trained(paths.model_file("mlp"))
    mirror = torch.from_numpy(test.images).flip(3).numpy()
    expected = (
        predict_logits(net, test.images).softmax(1) + predict_logits(net, mirror).softmax(1)
    ) / 2
    loss = F.nll_loss(expected.log(), torch.as_tensor(test.labels))
    assert averaged["mlp"]["test_loss"] == pytest.approx(float(loss), abs=1e-5)
    logits = logits_on_test(net, "mlp", None, test.images, hflip=True)  # from images
    torch.testing.assert_close(logits.softmax(1), expected)
    predictions = pd.read_csv(paths.predictions_file("mlp"))
    np.testing.assert_allclose(predictions["confidence"], expected.max(1).values, atol=1e-4)
    # A frozen backbone averages over the cached features of the mirrored test images.
    flipped = np.load(paths.features_file("vgg16", paths.FLIPPED_TEST))
    net, _, _ = load_trained(paths.model_file("vgg16"))
    plain_features = np.load(paths.features_file("vgg16", "test"))
    assert flipped.shape == plain_features.shape and not np.array_equal(flipped, plain_features)
    expected = (
        predict_logits(net, plain_features).softmax(1) + predict_logits(net, flipped).softmax(1)
    ) / 2
    torch.testing.assert_close(
        logits_on_test(net, "vgg16", "features", plain_features, True).softmax(1), expected
    )
    paths.features_file("vgg16", paths.FLIPPED_TEST).unlink()
    with pytest.raises(UserError, match="evaluate.hflip is true but features/vgg16/test_flipped"):
        evaluate_models(["vgg16"], hflip=True)

"""`python -m transfer_study predict`: top-3 classes of image files with a trained model."""

import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, REPO, RunsCode, only, params, save_test_images
from PIL import Image

from transfer_study.core import paths
from transfer_study.core.markers import skip_training
from transfer_study.core.stage import UserError
from transfer_study.evaluate import evaluate_models
from transfer_study.featurize import featurize_model
from transfer_study.inference import predict_logits
from transfer_study.nn.build import load_trained
from transfer_study.predict import predict_files
from transfer_study.train.fit import train_model


def test_cli_prints_the_top_three_classes(study):
    image_paths, test = save_test_images(study.root)  # the study's MLP trained 4 epochs
    odd = Path(os.fsdecode(bytes(study.root) + b"/caf\xe9.png"))  # Latin-1 bytes: not UTF-8
    shutil.copy(image_paths[0], odd)
    result = subprocess.run(
        [sys.executable, "-m", "transfer_study", "predict", "--model", "mlp"]
        + [*map(str, image_paths), str(odd)],
        cwd=study.root,
        # Strict UTF-8, as under many desktop locales: the odd name must print escaped.
        env={**os.environ, "PYTHONPATH": f"{REPO}/src", "PYTHONIOENCODING": "utf-8:strict"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4 * 4 and lines[0] == str(image_paths[0])
    assert lines[12] == f"{study.root}/caf\\xe9.png" and lines[13:] == lines[1:4]
    ranked = [line.split() for line in lines[1:4]]
    assert all(name in CLASSES for name, _ in ranked)
    probabilities = [float(p) for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001
    # The same answer as the network on the stored test pixels.
    net, _, _ = load_trained(paths.model_file("mlp"))
    expected = predict_logits(net, test.images[:1]).softmax(dim=1)[0]
    assert ranked[0][0] == CLASSES[int(expected.argmax())]
    assert probabilities[0] == pytest.approx(float(expected.max()), abs=1e-3)


def test_frozen_backbone_predicts_through_its_extractor(study):
    image_paths, test = save_test_images(study.root, count=2)  # VGG16: featurized, trained
    results = list(predict_files("vgg16", image_paths, top=3))
    assert [path for path, _, _ in results] == image_paths
    net, _, _ = load_trained(paths.model_file("vgg16"))
    features = torch.from_numpy(np.load(paths.features_file("vgg16", "test"))[:2])
    expected = predict_logits(net, features).softmax(dim=1)
    for (_, ranked, _), row in zip(results, expected):
        assert len(ranked) == 3 and ranked[0][0] == CLASSES[int(row.argmax())]


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_the_larger_lites_featurize_train_evaluate_and_predict(workdir, archive, name):
    """What their stages run, for the Lites the tiny study leaves out (random weights at 32 px;
    their ImageNet features: test_pretrained.py), then predict on image files."""
    settings = params(archive, models=only(name))
    featurize_model(name, settings.model(name))
    assert train_model(name, settings)["epochs"] == 2
    assert set(evaluate_models([name])) == {name}
    image_paths, _ = save_test_images(workdir, count=2)
    net, _, _ = load_trained(paths.model_file(name))
    features = torch.from_numpy(np.load(paths.features_file(name, "test"))[:2])
    expected = predict_logits(net, features).softmax(dim=1)
    for (_, ranked, _), row in zip(predict_files(name, image_paths, top=3), expected):
        assert ranked[0][0] == CLASSES[int(row.argmax())]
        assert ranked[0][1] == pytest.approx(float(row.max()), abs=1e-2)


def test_predict_explains_what_is_missing(workdir, archive):
    with pytest.raises(UserError, match="models/mlp.pt does not exist: train it first"):
        list(predict_files("mlp", ["x.png"]))
    skip_training("mlp")
    with pytest.raises(UserError, match="mlp was left out of `models`"):
        list(predict_files("mlp", ["x.png"]))


def predict_cli(capsys, *args):
    """`python -m transfer_study predict ARGS`, run in this process: (exit status, stdout,
    stderr). test_cli_prints_the_top_three_classes runs it as a command."""
    from transfer_study import __main__ as cli

    capsys.readouterr()
    try:
        cli.main(["predict", *map(str, args)])
        status = 0
    except SystemExit as exit:
        status = exit.code
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def test_a_folder_with_a_bad_file_classifies_the_rest_and_fails(study, capsys):
    folder = study.root / "images"
    (folder / "more").mkdir(parents=True)
    image_paths, _ = save_test_images(folder, count=3)
    image_paths[2].rename(folder / "more" / "deep.png")  # folders are walked recursively
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file name: left alone")
    status, stdout, stderr = predict_cli(
        capsys, "--model", "mlp", "--format", "csv", folder, "missing.png"
    )
    assert status == 1
    errors = stderr.strip().splitlines()
    assert errors[0] == "error: missing.png: no such file or folder"
    assert errors[1].startswith(f"error: cannot read image {folder / 'broken.jpg'} (")
    assert errors[2] == "2 of 5 inputs failed"
    rows = list(csv.DictReader(io.StringIO(stdout)))
    expected = [folder / "more" / "deep.png", folder / "test0.png", folder / "test1.png"]
    assert [row["path"] for row in rows] == [str(p) for p in expected]  # sorted, bad one out
    for row in rows:
        assert row["class_1"] in CLASSES
        probabilities = [float(row[f"probability_{k}"]) for k in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001


@pytest.mark.parametrize("form", ["text", "csv", "json"])
def test_any_file_name_prints_and_folders_are_listed_as_split_lists_them(study, form, capsys):
    folder = study.root / "images"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (image,), _ = save_test_images(folder, count=1)
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))  # Latin-1 bytes: not UTF-8
    shutil.copy(image, odd)
    shutil.copy(image, folder / ".ipynb_checkpoints" / "test0-checkpoint.png")
    (folder / "._test0.png").write_bytes(b"\0\5\26\7 macOS resource fork, not a PNG")
    (folder / "linked").symlink_to(study.root / paths.SPLIT_DIR)
    status, stdout, stderr = predict_cli(capsys, "--model", "mlp", "--format", form, folder)
    assert status == 1, stderr
    assert stderr.splitlines() == [
        f"error: {folder / 'linked'}: a link to a folder, not followed",
        "1 of 3 inputs failed",
    ]
    shown = [f"{folder}/caf\\xe9.png", str(image)]  # the odd byte escaped; hidden ones left out
    if form == "json":
        printed = [json.loads(line)["path"] for line in stdout.splitlines()]
    elif form == "csv":
        printed = [row["path"] for row in csv.DictReader(io.StringIO(stdout))]
    else:
        printed = [line for line in stdout.splitlines() if not line.startswith(" ")]
    assert printed == shown


def test_a_photo_is_classified_upright_by_its_exif_orientation(study):
    (image,), _ = save_test_images(study.root, count=1)
    exif = Image.Exif()
    exif[0x0112] = 8  # Orientation: the stored pixels are to be turned 90 degrees anticlockwise
    with Image.open(image) as upright:
        upright.transpose(Image.Transpose.ROTATE_270).save(study.root / "phone.png", exif=exif)
        upright.transpose(Image.Transpose.ROTATE_270).save(study.root / "sideways.png")
    (_, as_is, _), (_, phone, _), (_, sideways, _) = predict_files(
        "mlp", [image, study.root / "phone.png", study.root / "sideways.png"], top=10
    )
    assert dict(phone) == pytest.approx(dict(as_is))  # every class's probability
    assert dict(sideways) != pytest.approx(dict(as_is), abs=1e-3)  # what was read before


def test_json_lines_and_batches_match_one_image_at_a_time(study, capsys):
    image_paths, _ = save_test_images(study.root, count=5)
    status, stdout, stderr = predict_cli(
        capsys, "--model", "mlp", "--format", "json", "--top", "2", *image_paths
    )
    assert status == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in image_paths]
    assert all(len(line["top"]) == 2 for line in lines)
    one_by_one = [next(predict_files("mlp", [p], top=2)) for p in image_paths]
    batched = list(predict_files("mlp", image_paths, top=2, batch_size=2))
    for (_, alone, _), (_, together, _), line in zip(one_by_one, batched, lines):
        assert (
            [c for c, _ in alone] == [c for c, _ in together] == [t["class"] for t in line["top"]]
        )
        assert [p for _, p in alone] == pytest.approx([p for _, p in together], abs=1e-5)


def _tampered(path, sentinel, good):
    torch.save({"state_dict": RunsCode(sentinel), "config": {}}, path)


def _plain_pickle(path, sentinel, good):
    path.write_bytes(pickle.dumps(RunsCode(sentinel)))


def _truncated(path, sentinel, good):
    path.write_bytes(good[: len(good) // 2])


def _empty(path, sentinel, good):
    path.write_bytes(b"")


def _changed(edit):
    """A damage that saves the good file with `edit` applied to what it holds."""

    def damage(path, sentinel, good):
        saved = torch.load(io.BytesIO(good), weights_only=True)
        edit(saved)
        torch.save(saved, path)

    return damage


def _wrong_shape(saved):
    saved["config"]["section"]["hidden"] = [10**9, 10**9]  # would need exabytes if built


def _huge_images(saved):
    saved["config"]["data"]["shape"] = [3, 100_000, 100_000]  # predict would read at this


def _odd_statistics(saved):
    saved["config"]["data"]["mean"] = [0.5] * 5  # five channels' means for RGB images


def _renamed(saved):
    saved["config"]["name"] = "lite0"


# What, and how, model files that must be refused are damaged: tampered, truncated, wrong shape.
DAMAGES = {
    "tampered": _tampered,
    "plain pickle": _plain_pickle,
    "truncated": _truncated,
    "empty": _empty,
    "wrong shape": _changed(_wrong_shape),
    "huge input shape": _changed(_huge_images),
    "odd statistics": _changed(_odd_statistics),
    "another model's": _changed(_renamed),
}


def _check_refusal(message, what):
    assert "\n" not in message and message.startswith("models/mlp.pt "), (what, message)
    assert "dvc checkout models/mlp.pt" in message and "dvc repro train_mlp" in message, what
    assert "weights_only" not in message, what


@pytest.mark.parametrize("what", DAMAGES)
def test_a_damaged_model_file_is_refused_by_predict_and_evaluate(study, what):
    """Each damage through the real predict and evaluate code: one message naming the file
    and the remedies, nothing of the file run (its sentinel never appears)."""
    (image,), _ = save_test_images(study.root, count=1)
    model, sentinel = paths.model_file("mlp"), study.root / "sentinel"
    DAMAGES[what](model, sentinel, model.read_bytes())
    for command in (lambda: list(predict_files("mlp", [image])), lambda: evaluate_models(["mlp"])):
        with pytest.raises(UserError) as refused:
            command()
        _check_refusal(str(refused.value), what)
    assert not sentinel.exists(), what


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_tampered_model_file_stops_the_command_with_one_line(study, command, capsys):
    """The exit status and stderr of the command itself, for one damage (the others reach the
    same wrapper: test_a_damaged_model_file_is_refused_by_predict_and_evaluate)."""
    (image,), _ = save_test_images(study.root, count=1)
    sentinel = study.root / "sentinel"
    _tampered(paths.model_file("mlp"), sentinel, None)
    if command == "predict":
        status, _, stderr = predict_cli(capsys, "--model", "mlp", image)
    else:  # the stage script, as DVC runs it
        shutil.copy(f"{REPO}/params.yaml", study.root / "params.yaml")
        result = subprocess.run(
            [sys.executable, f"{REPO}/stages/evaluate.py"],
            cwd=study.root,
            env={**os.environ, "PYTHONPATH": f"{REPO}/src"},
            capture_output=True,
            text=True,
        )
        status, stderr = result.returncode, result.stderr
    assert status == 2, stderr[-2000:]
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ")
    _check_refusal(line.removeprefix("error: "), "tampered")
    assert not sentinel.exists()


def test_many_images_get_a_progress_bar_on_stderr(study, monkeypatch, capsys):
    from transfer_study import __main__ as cli

    image_paths, _ = save_test_images(study.root, count=3)
    capsys.readouterr()
    cli.main(["predict", "--model", "mlp", "--format", "json", *map(str, image_paths)])
    assert "img" not in capsys.readouterr().err  # a few images: no bar
    monkeypatch.setattr(cli, "PROGRESS_FROM", 3)
    cli.main(["predict", "--model", "mlp", "--format", "json", *map(str, image_paths)])
    output = capsys.readouterr()
    assert "3/3" in output.err and len(output.out.splitlines()) == 3

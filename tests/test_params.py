"""params.yaml parsing: YAML 1.1 numbers, overrides, and one clear line for each bad value."""

import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from transfer_study.core.config import load_params
from transfer_study.core.params_file import read_params
from transfer_study.core.stage import (
    RANK_VARIABLES,
    SIZE_VARIABLES,
    ParamsError,
    exit_on_user_error,
)

PARAMS = f"{REPO}/params.yaml"


def test_repository_params_parse():
    params = load_params(PARAMS)
    assert params.models == ("mlp", "vgg16", "inception", "lite0")  # lite1, lite2, resnet50: off
    assert list(params.model_sections) == [*params.models, "lite1", "lite2", "resnet50"]
    assert params.model("vgg16").image_size == 224 and params.model("inception").image_size == 299


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-4` as the string '1e-4'; it must still be 0.0001.
    text = open(PARAMS).read().replace("  lr: 1e-3\n", "  lr: 1e-4\n")
    assert "lr: 1e-4" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 0.0001 and isinstance(params.train.lr, float)
    assert params.model("mlp").train.lr == 0.0001


def test_crop_may_stay_shared_while_frozen_backbones_sit_out():
    left_out = {"vgg16": False, "inception": False, "lite0": False}
    params = load_params(PARAMS, {"models": left_out, "train": {"crop": 4}})
    assert params.model("mlp").train.crop == 4


def test_trainable_layers_takes_a_count_or_all():
    params = load_params(PARAMS, {"vgg16": {"trainable_layers": 3}})
    assert params.model("vgg16").trainable_layers == 3
    assert load_params(PARAMS).model("resnet50").trainable_layers == "all"


def test_model_train_section_overrides_only_that_model():
    params = load_params(PARAMS, {"vgg16": {"train": {"lr": "3e-5", "optimizer": "sgd"}}})
    assert params.model("vgg16").train.lr == 3e-5
    assert params.model("vgg16").train.optimizer == "sgd"
    assert params.model("mlp").train.lr == params.train.lr == 0.001


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"vgg16": {"head": {"widths": [3]}}}, "unknown key 'vgg16.head.widths'"),
        ({"resnet": {}}, "unknown key 'resnet'"),
        ({"train": {"lr": 0}}, "train.lr = 0.0: accepts a number > 0"),
        ({"train": {"lr": 1e38}}, "train.lr = 1e+38: accepts a number > 0, at most 1,000,000"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"batch_size": 12.5}}, "train.batch_size: expected an integer"),
        ({"train": {"optimizer": "lion"}}, "train.optimizer = 'lion': accepts one of adam"),
        ({"mlp": {"activation": "swish"}}, "mlp.activation = 'swish': accepts one of relu"),
        ({"mlp": {"train": {"lr": -1}}}, "mlp.train.lr = -1.0"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction = 1.0: accepts a number in (0, 1)"),
        ({"mlp": {"image_size": 2}}, "mlp.image_size = 2: accepts an integer from 4 to 256"),
        ({"models": {"resnet": True}}, "models lists 'resnet', which has no section"),
        (
            {"resnet99": {}},
            "unknown key 'resnet99' (valid: seed, models, data, train, evaluate, or the",
        ),
        (  # as `dvc exp run -S ++nosection.x=1` leaves params.yaml: the likely cause is named
            {"nosection": {"x": 1}},
            "; a misspelt `dvc exp run -S ++key=...` adds such a key: remove it from params.yaml",
        ),
        ({"models": ["mlp", "lite0"]}, "models: expected a mapping of model name -> true or"),
        ({"models": {"vgg16": "yes"}}, "models.vgg16: expected true or false, got 'yes'"),
        (
            {"models": {"mlp": False, "vgg16": False, "inception": False, "lite0": False}},
            "models: every model is false; set at least one to true",
        ),
        ({"vgg16": {"trainable_layers": -1}}, "vgg16.trainable_layers = -1: accepts an"),
        ({"vgg16": {"trainable_layers": "most"}}, "vgg16.trainable_layers = 'most'"),
        ({"vgg16": {"lr_decay": 1.5}}, "vgg16.lr_decay = 1.5: accepts a number in (0, 1]"),
        ({"train": {"crop": 4}}, "vgg16.train.crop = 4: accepts 0 while vgg16.trainable_layers"),
        ({"train": {"crop": -1}}, "train.crop = -1: accepts an integer >= 0"),
        ({"data": {"dataset": "svhn"}}, "data.dataset = 'svhn': accepts one of cifar10, mnist"),
        ({"data": {"bad_images": "ignore"}}, "data.bad_images = 'ignore': accepts one of fail"),
        ({"data": {"dataset": "mnist", "md5": "0" * 32}}, "accepts official, null (no check)"),
        ({"data": {"md5": "abc"}}, "data.md5 = 'abc': accepts official, null (no check) or a"),
        ({"data": {"image_size": 64}}, "data.image_size = 64: accepts null for cifar10"),
        ({"data": {"dataset": "folder"}}, "data.image_size = None: accepts an integer from 8"),
        ({"vgg16": {"weights": "/no/such.pth"}}, "vgg16.weights = '/no/such.pth'"),
        ({"train": {"hflip": "yes"}}, "train.hflip: expected true or false"),
        ({"seed": -1}, "seed = -1: accepts an integer from 0 to 4294967295"),
        ({"train": {"warmup_epochs": 30}}, "train.warmup_epochs = 30.0: accepts a number >= 0 and"),
        ({"train": {"max_epochs": 0}}, "train.max_epochs = 0: accepts an integer >= 1"),
        ({"train": {"per_class": 0}}, "train.per_class = 0: accepts null (every train image) or"),
        ({"lite0": {"train": {"per_class": "few"}}}, "lite0.train.per_class: expected an integer"),
        ({"models": {"Bad-Name": True}}, "models: 'Bad-Name' is not a model name (lowercase"),
        ({"train": {"lr": "x" * 10**6}}, "train.lr: expected a number, got 'xxxxxxxxxxxxx"),
        ({"train": {"label_smoothing": 1}}, "train.label_smoothing = 1.0: accepts a number in [0,"),
        ({"mlp": {"train": {"mixup": -0.2}}}, "mlp.train.mixup = -0.2: accepts a number >= 0"),
        ({"mlp": {"norm": "group"}}, "mlp.norm = 'group': accepts one of none, batch, layer"),
        ({"mlp": {"residual": 1}}, "mlp.residual: expected true or false, got 1"),
        ({"mlp": {"residual": True}}, "mlp.residual = True: accepts false with mlp.hidden = [256"),
        ({"evaluate": {"tta": True}}, "unknown key 'evaluate.tta' (valid: hflip)"),
        ({"mlp": {"hidden": {512, 256}}}, "mlp.hidden: expected a list, got {256, 512}"),
        ({"lite0": {"featurize_precision": "fp16"}}, "accepts one of auto, bf16, fp32"),
        ({"lite0": {"head_epochs": -1}}, "lite0.head_epochs = -1: accepts an integer >= 0"),
        ({"seed": 99999999999999999999}, "seed = 99999999999999999999: accepts an integer from 0"),
        ({"mlp": {"image_size": 2048}}, "mlp.image_size = 2048: accepts an integer from 4 to 256"),
        ({"vgg16": {"image_size": 4096}}, "vgg16.image_size = 4096: accepts an integer up to 1024"),
        ({"data": {"path": "/usr"}}, "data.path = '/usr': accepts data/images for cifar10"),
        (
            {"data": {"dataset": "folder", "image_size": 5000}},
            "data.image_size = 5000: accepts an integer from 8 to 1024",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ParamsError) as error:
        load_params(PARAMS, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_key_is_named(tmp_path):
    text = open(PARAMS).read().replace("  gamma: 0.95\n", "")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="missing key 'train.gamma'"):
        load_params(tmp_path / "params.yaml")


def alias_bomb(levels=12):
    """A YAML flow list whose last item nests 9**levels ones by reference: a few hundred bytes
    that PyYAML loads at once, and that a full repr would never finish."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


LRR = (
    "error: unknown key 'train.lrr' (valid: optimizer, lr, momentum, weight_decay, l1, "
    "scheduler, gamma, warmup_epochs, label_smoothing, mixup, per_class, batch_size, max_epochs, "
    "patience, min_delta, hflip, crop, accelerator, devices, num_nodes, rendezvous_timeout, "
    "strategy, precision, compile, deterministic, resume)"
)


@pytest.mark.parametrize(
    "change, line",
    [
        (("  lr: 1e-3\n", "  lrr: 1e-3\n"), LRR),
        (("  lr: 1e-3\n", f"  lr: {alias_bomb()}\n"), "error: train.lr: expected a number, got [["),
        (
            ("seed: 42", "seed: " + "7" * 5000),
            "error: params.yaml is not valid YAML: an integer too long",
        ),
        (
            ("seed: 42", "seed: '" + "x" * 50_000_000 + "'"),
            "error: params.yaml is larger than 1 MiB",
        ),
        (
            ("seed: 42", "seed: '" + "x" * 500_000 + "'"),
            "error: seed: expected an integer, got 'xx",
        ),
        (("  lr: 1e-3\n", "  lr: [1e-3\n"), "error: params.yaml is not valid YAML: line "),
        (("seed: 42", "seed: " + "[" * 100_000), "error: params.yaml is not valid YAML: lists or"),
    ],
    ids=["unknown-key", "alias-bomb", "huge-integer", "50-MB", "long-string", "syntax", "deep"],
)
def test_stage_prints_one_bounded_line_and_exits_2(tmp_path, change, line):
    text = open(PARAMS).read()
    assert change[0] in text
    (tmp_path / "params.yaml").write_text(text.replace(*change, 1))
    result = subprocess.run(
        [sys.executable, f"{REPO}/stages/download.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # an unbounded repr of the alias bomb would not end
    )
    assert result.returncode == 2
    (printed,) = result.stderr.strip().splitlines()
    assert printed.startswith(line) and len(printed) <= max(len(LRR), 200)


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    # PyYAML keeps the last value; DVC refuses the file, so the stage must too.
    text = open(PARAMS).read()
    first = text.splitlines().index("  lr: 1e-3") + 1
    twice = text.replace("  lr: 1e-3\n", "  lr: 1e-3\n  lr: 1e-2\n", 1)
    (tmp_path / "params.yaml").write_text(twice)
    result = subprocess.run(
        [sys.executable, f"{REPO}/stages/download.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: params.yaml is not valid YAML: line {first + 1}, column 3: key 'lr' given "
        f"twice, on lines {first} and {first + 1}"
    ]
    # A merge key's values may be given again: that is how YAML overrides them.
    (tmp_path / "merged.yaml").write_text("base: &base {lr: 1}\ntrain:\n  <<: *base\n  lr: 2\n")
    assert read_params(tmp_path / "merged.yaml")["train"] == {"lr": 2}


def test_a_yaml_error_keeps_its_line_and_column(tmp_path):
    text = open(PARAMS).read().replace("  gamma: 0.95\n", "  gamma: [0.95\n")
    (tmp_path / "params.yaml").write_text(text)
    row = text.splitlines().index("  gamma: [0.95") + 1
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'params.yaml'} is not valid YAML: line ")
    assert "\n" not in message and int(message.split("line ")[1].split(",")[0]) > row


def test_a_model_without_stages_is_refused_before_anything_runs(tmp_path):
    raw = yaml.safe_load(open(PARAMS))
    raw["models"]["resnet18"] = True
    raw["resnet18"] = raw["resnet50"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text(open(f"{REPO}/dvc.yaml").read())
    with pytest.raises(
        ParamsError,
        match="models.resnet18 is true, but dvc.yaml has no "
        "featurize_resnet18 or train_resnet18 stage",
    ):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").unlink()  # no pipeline beside the params: nothing to check
    assert "resnet18" in load_params(tmp_path / "params.yaml").models


@pytest.mark.parametrize(
    "script, args, message, node_rank",
    [
        (
            "train",
            [],
            "expected one model name: python stages/train.py MODEL, MODEL one of: mlp,",
            None,
        ),
        ("train", ["mlp", "vgg16"], "expected one model name", None),
        ("train", ["mlpp"], "'mlpp' is not a model with a train stage", None),
        ("train", ["../../x"], "'../../x' is not a model with a train stage", None),
        (
            "featurize",
            ["/tmp/features"],
            "'/tmp/features' is not a model with a featurize stage",
            None,
        ),
        ("featurize", ["mlp"], "'mlp' is not a model with a featurize stage", None),
        # A node started by hand with a typo in its rank: one line before any work.
        ("train", ["mlp"], "environment variable NODE_RANK = 'one': accepts a whole number", "one"),
    ],
)
def test_stage_scripts_take_only_a_model_with_that_stage(
    tmp_path, script, args, message, node_rank
):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        (project / name).write_text(open(f"{REPO}/{name}").read())
    result = subprocess.run(
        [sys.executable, f"{REPO}/stages/{script}.py", *args],
        cwd=project,
        env={**os.environ, **({"NODE_RANK": node_rank} if node_rank else {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")
    # Nothing written, in the project or beside it.
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dvc.yaml", "params.yaml", "project"]


@pytest.mark.parametrize(
    "launcher, message",
    [
        ({"RANK": "-1"}, "RANK = '-1': accepts a whole number from 0 to 0 (below WORLD_SIZE, 1 "),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK = '2': accepts a whole number from 0 to 1 "),
        (
            {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"},
            "LOCAL_RANK = '2': accepts a whole number from 0 to 1 (below LOCAL_WORLD_SIZE, 2)",
        ),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID = '2': accepts a whole "),
        ({"NODE_RANK": str(10**20)}, f"NODE_RANK = '{10**20}': accepts a whole number from 0 "),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE = '0': accepts a whole number from 1 to 1,048,576"),
        ({"WORLD_SIZE": "-1"}, "WORLD_SIZE = '-1': accepts a whole number from 1 to 1,048,576"),
        ({"SLURM_NTASKS": ""}, "SLURM_NTASKS = '': accepts a whole number"),
        ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS = 'x': accepts a whole number"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set: RANK = 1 of WORLD_SIZE = 2 "),
    ],
)
def test_launcher_variables_out_of_range_stop_a_stage_before_any_work(
    monkeypatch, capsys, launcher, message
):
    for name in (*RANK_VARIABLES, *SIZE_VARIABLES, "MASTER_ADDR"):  # the suite's own launcher's
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    work = []
    stage_main = exit_on_user_error(lambda: work.append("started"))
    with pytest.raises(SystemExit) as stop:
        stage_main()
    assert stop.value.code == 2 and work == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: environment variable {message}")


def test_launcher_variables_that_a_launcher_sets_together_pass(monkeypatch):
    for name in (*RANK_VARIABLES, *SIZE_VARIABLES, "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    # What Lightning's DDP launcher gives its second process, then what torchrun gives rank 3.
    for launcher in (
        {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
        {"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "4"}
        | {"LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0"},
    ):
        with monkeypatch.context() as patch:
            for name, value in launcher.items():
                patch.setenv(name, value)
            assert exit_on_user_error(lambda: "ran")() == "ran"

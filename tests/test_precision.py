"""The autocast dtype each device gets: bf16 or fp16 on a GPU by its compute capability, the same
for featurizing, training and evaluation; featurize's precision on a CPU, probed or pinned. GPUs
are faked: the suite runs on a CPU."""

import numpy as np
import pytest
import torch
from helpers import params

from transfer_study import featurize
from transfer_study.nn import device as device_module
from transfer_study.nn.device import DTYPE_NAMES, autocast_dtype, featurize_dtype
from transfer_study.train.trainer import resolve_precision

CUDA = torch.device("cuda")
# Compute capabilities: a hosted notebook's T4 (Turing), a V100 (Volta), an A100, an H100.
GPUS = {(7, 5): "fp16", (7, 0): "fp16", (8, 0): "bf16", (9, 0): "bf16"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability): CUDA visible, its device of that compute capability; bf16 tensors
    can be made on it whatever its capability, as torch's emulation allows on a T4."""

    def fake(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.version, "hip", None)

    return fake


@pytest.mark.parametrize(("capability", "dtype"), GPUS.items())
def test_a_gpu_autocasts_to_bf16_only_with_bf16_units_else_fp16(fake_gpu, capability, dtype):
    fake_gpu(capability)
    assert DTYPE_NAMES[autocast_dtype(CUDA)] == dtype
    assert DTYPE_NAMES[featurize_dtype(CUDA)] == dtype  # whatever the host CPU has


@pytest.mark.parametrize(("capability", "dtype"), GPUS.items())
def test_training_on_a_gpu_takes_the_same_dtype_with_fp16_loss_scaling(
    fake_gpu, archive, capability, dtype
):
    fake_gpu(capability)
    train = params(archive).model("mlp").train  # precision: auto, accelerator: auto
    assert resolve_precision(train) == {"fp16": "16-mixed", "bf16": "bf16-mixed"}[dtype]
    on_cpu = params(archive, train={"accelerator": "cpu"}).model("mlp").train
    assert resolve_precision(on_cpu) == "32-true"
    pinned = params(archive, train={"precision": "32-true"}).model("mlp").train
    assert resolve_precision(pinned) == "32-true"  # an explicit choice stays


@pytest.mark.parametrize("has_bf16", [True, False])
def test_the_cpu_trains_in_fp32_and_featurizes_in_bf16_where_it_has_bf16(monkeypatch, has_bf16):
    monkeypatch.setattr(device_module, "_cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None
    assert featurize_dtype(cpu) == (torch.bfloat16 if has_bf16 else None)


CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [({"bf16": 30.0, "fp32": 20.0}, torch.bfloat16), ({"bf16": 22.0, "fp32": 20.0}, None)],
)
def test_auto_keeps_bf16_only_where_the_probe_finds_it_clearly_faster(monkeypatch, rates, chosen):
    monkeypatch.setattr(device_module, "_cpu_has_bf16", lambda: True)
    dtypes = {torch.bfloat16: "bf16", None: "fp32"}
    monkeypatch.setattr(
        featurize, "_probe_rate", lambda extractor, batch, dtype: rates[dtypes[dtype]]
    )
    images = np.zeros((4, 3, 8, 8), np.uint8)
    assert featurize.choose_precision("auto", None, images, CPU) == (chosen, rates)


@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_a_pinned_precision_is_kept_and_probes_nothing(monkeypatch, has_bf16, precision, dtype):
    monkeypatch.setattr(device_module, "_cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(featurize, "_probe_rate", None)  # a probe would fail: it must not run
    assert featurize.choose_precision(precision, None, None, CPU) == (dtype, {})


def test_auto_on_a_cpu_without_bf16_is_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(device_module, "_cpu_has_bf16", lambda: False)
    monkeypatch.setattr(featurize, "_probe_rate", None)
    assert featurize.choose_precision("auto", None, None, CPU) == (None, {})


def test_featurize_records_the_probe_and_the_precision_it_chose(workdir, archive, monkeypatch):
    monkeypatch.setattr(device_module, "_cpu_has_bf16", lambda: True)
    section = params(archive, lite0={"featurize_precision": "auto"}).model("lite0")
    metrics = featurize.featurize_model("lite0", section)
    probe = metrics["precision_probe"]
    assert probe.keys() == {"bf16", "fp32"} and min(probe.values()) > 0
    faster = probe["bf16"] >= featurize.BF16_MARGIN * probe["fp32"]
    assert metrics["precision"] == ("bf16" if faster else "fp32")

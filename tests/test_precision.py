"""The autocast dtype each device gets: bf16 or fp16 on a GPU by its compute capability, the same
for featurizing, training and evaluation. GPUs are faked: the suite runs on a CPU."""

import pytest
import torch
from helpers import params

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

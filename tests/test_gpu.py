"""The CUDA path (bf16 or fp16 autocast, channels_last, GPU-resident data); run with
`pytest -m gpu`."""

import numpy as np
import pytest
import torch
from helpers import params

from transfer_study.core import paths
from transfer_study.featurize import featurize
from transfer_study.inference import prepare_extractor
from transfer_study.nn.backbones import backbone_spec, feature_extractor
from transfer_study.nn.device import LIGHTNING_PRECISION, autocast_dtype
from transfer_study.train.fit import train_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_mixed_precision_features_match_cpu_fp32(tmp_path):
    torch.manual_seed(0)
    extractor = feature_extractor("vgg16", "none", 224)
    images = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    outputs = {}
    for device, dtype in (("cpu", None), ("cuda", "auto")):  # fp32 reference, bf16 or fp16
        model = prepare_extractor(extractor, torch.device(device))
        featurize(
            model,
            images,
            tmp_path / f"{device}.npy",
            backbone_spec("vgg16").feature_dim,
            torch.device(device),
            dtype=dtype,
        )
        outputs[device] = np.load(tmp_path / f"{device}.npy").astype(np.float64)
    error = np.linalg.norm(outputs["cuda"] - outputs["cpu"]) / np.linalg.norm(outputs["cpu"])
    assert error < 3e-2


def test_training_on_the_gpu_in_mixed_precision(workdir, archive):
    metrics = train_model("mlp", params(archive))
    expected = LIGHTNING_PRECISION[autocast_dtype(torch.device("cuda"))]  # bf16, or fp16 on a T4
    assert metrics["precision"] == expected and metrics["device"] != "cpu"
    assert paths.model_file("mlp").exists()

"""Device choice and the CUDA speed settings shared by featurizing, training and evaluation."""

import torch


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device):
    """bf16 where the device has fast bf16 matrix units (CUDA Ampere and newer), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def enable_fast_cuda():
    """TF32 for fp32 matmuls and convolutions, and cuDNN autotuning for our fixed input shapes.
    No effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

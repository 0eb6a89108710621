"""Device choice and the CUDA speed settings shared by featurizing, training and evaluation."""

import os

import torch


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# What each autocast dtype is called in the stages' metrics and in Lightning's `precision`.
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
LIGHTNING_PRECISION = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", None: "32-true"}


def autocast_dtype(device):
    """The autocast dtype on CUDA: bf16 where the GPU has bf16 units (Ampere and newer), else fp16,
    which Volta and Turing (a hosted notebook's T4) run on their tensor cores; None (fp32) off
    CUDA. Training's `precision: auto` picks the same (LIGHTNING_PRECISION), so evaluation
    computes as training did.

    Asked of the compute capability, not torch.cuda.is_bf16_supported(), which by default also
    says yes on a T4, where bf16 is only emulated and runs slower than fp32.
    """
    if device.type != "cuda":
        return None
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


def featurize_dtype(device):
    """Like autocast_dtype, and bf16 on CPUs with bf16 instructions too: a frozen backbone's
    forward pass loses little to bf16 (about 0.7% relative error on VGG16 features) and runs
    3-5x faster on a CPU with AMX or AVX512-BF16."""
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return autocast_dtype(device)


def _cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:  # not Linux: stay with fp32
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def enable_fast_cuda():
    """TF32 for fp32 matmuls and convolutions, and cuDNN autotuning for our fixed input shapes.
    No effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def memory_bytes(device):
    """The memory a network trains in on `device`: the GPU's, or the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

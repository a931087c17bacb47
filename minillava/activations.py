"""The vision towers' MLP activations by config.json's `hidden_act` (transformers' ACT2FN names).

Its own module so that the config's validation (validate.py) and the towers (clip.py) both read it
without importing each other.
"""

import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# config.json's hidden_act -> the function; CLIP's is quick_gelu, SigLIP's gelu_pytorch_tanh
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}

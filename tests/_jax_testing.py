"""Helpers shared by the tests/test_jax_*.py files (the PyTorch side is their reference)."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.torch.model import Transformer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The torch reference on one thread: OpenMP spin-waits stall badly beside XLA's threads on a
    busy CPU. Import this fixture into a test module to apply it to every test there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed_torch_model(config: ModelConfig, scale: float = 0.1, seed: int = 0) -> Transformer:
    """A PyTorch model whose every parameter (gains and biases too) is moved away from its init,
    so parity tests exercise every tensor; larger scales make greedy paths less trivial."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model

"""The JAX tests compare against PyTorch: run the torch reference on one thread, since OpenMP
spin-waits stall badly beside XLA's threads on a busy CPU."""

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

import pytest
import torch

from tests.bench.conftest import bench_cache, vision_smoke  # noqa: F401  (shared fixtures)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (several thrash on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

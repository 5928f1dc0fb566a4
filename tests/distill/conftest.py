import pytest

from tests.bench.conftest import bench_cache  # noqa: F401  (shared fixtures)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield

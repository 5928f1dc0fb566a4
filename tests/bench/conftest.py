import os

import pytest


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory):
    """A private suite cache for the whole test session (smoke suites build once)."""
    path = tmp_path_factory.mktemp("modelalloy-cache")
    old = os.environ.get("MODELALLOY_CACHE")
    os.environ["MODELALLOY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MODELALLOY_CACHE", None)
    else:
        os.environ["MODELALLOY_CACHE"] = old


@pytest.fixture(scope="session")
def vision_smoke(bench_cache):
    from modelalloy.bench import load_suite

    return load_suite("tiny-vision", "smoke")

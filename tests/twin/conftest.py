from tests.bench.conftest import bench_cache, vision_smoke  # noqa: F401  (shared fixtures)

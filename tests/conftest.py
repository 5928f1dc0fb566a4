"""Shared fixtures: tiny models built inside the tests, and an in-process CLI runner."""

from __future__ import annotations

import errno
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Collect once, then freeze what is left so that the exit does not walk it again.

    After the last test the heap holds ~0.5-1M objects, nearly all of them the ~4,500 modules
    the suite imports (torch, transformers, lm-eval, datasets, Ray, numba...). pytest's own
    unraisable-exception check collects twice more and the interpreter's shutdown collects
    several times over that heap: 5 s of exit for one bench file, over a minute for the whole
    suite on a loaded machine. The one collection here still runs every finalizer a test's
    garbage cycle has (pytest reports their exceptions: its hook is still installed, this
    hook runs before its own); the frozen survivors are left to the exit's reference counts
    and atexit handlers, which all still run.
    """
    gc.collect()
    gc.freeze()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
            ) -> Callable[..., CliResult]:
    """Run `modelalloy ARGS...` in-process through the real entry point."""
    from modelalloy.cli import main

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()  # drop what the test printed before (e.g. transformers' bars)
        monkeypatch.setattr(sys, "argv", ["modelalloy", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as stop:
            code = int(stop.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def save_gpt2_family(root: Path, n_experts: int = 2, seed: int = 0, scale: float = 0.02,
                     **save_kwargs) -> tuple[Path, list[Path]]:
    """A tiny GPT-2 base and experts (base + random deltas) saved as HF folders."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(tiny_gpt2_config())
    base.save_pretrained(root / "base", **save_kwargs)
    experts = []
    for i in range(n_experts):
        model = GPT2LMHeadModel(tiny_gpt2_config())
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        model.save_pretrained(root / f"expert{i}", **save_kwargs)
        experts.append(root / f"expert{i}")
    return root / "base", experts


@pytest.fixture
def gpt2_family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return save_gpt2_family(tmp_path)


def subprocess_env() -> dict[str, str]:
    """This environment with the repository's src/ first on PYTHONPATH, for `python -m
    modelalloy` in a child process."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def save_state_dict_folders(root: Path, state_dicts: list[dict[str, torch.Tensor]]
                            ) -> list[Path]:
    """One folder per state dict, ``root/m0``, ``root/m1``, ..., each with a model.safetensors."""
    from safetensors.torch import save_file

    folders = []
    for i, sd in enumerate(state_dicts):
        folder = root / f"m{i}"
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"))
        folders.append(folder)
    return folders


# -- built-in suites (tests/bench, tests/optimize) ---------------------------------------


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


@pytest.fixture(scope="session")
def lm_smoke(bench_cache):
    from modelalloy.bench import load_suite

    return load_suite("tiny-lm", "smoke")


@pytest.fixture
def one_thread():
    """Tiny models on one intra-op thread (several thrash on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def require_direct_io(path: Path, flags: int = os.O_RDONLY) -> None:
    """Skip unless ``path`` (an existing file) opens with ``O_DIRECT`` (tmpfs refuses it)."""
    try:
        os.close(os.open(path, flags | os.O_DIRECT))
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{path.parent} is on a filesystem that refuses O_DIRECT")
        raise

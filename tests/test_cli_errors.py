"""The command line's own errors, in child processes as a user meets them: one line on stderr,
a non-zero exit, no traceback; whatever the CLI library or a core install lacks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import save_gpt2_family, subprocess_env, write_recipe
from tests.engine.test_memory_and_kill import plain_models


def modelalloy(*args: str | Path, prelude: str = "", timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
    """`modelalloy ARGS` through the console entry point, after running `prelude`."""
    code = prelude + "\nimport sys\nfrom modelalloy.cli import entry\n" \
        f"sys.argv = ['modelalloy', *{[str(a) for a in args]!r}]\nentry()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family")
    base, experts = save_gpt2_family(root)
    return write_recipe(root / "r.yaml", f"merge_method: task_arithmetic\nbase_model: {base}\n"
                        "models:\n" + "".join(f"  - model: {e}\n" for e in experts))


def test_missing_argument_is_one_line(tmp_path):
    done = modelalloy("merge")
    line = assert_one_line_error(done, "modelalloy merge", "Missing argument", "--help")
    assert done.returncode == 2, line


def test_bad_seed_is_one_line(recipe, tmp_path):
    done = modelalloy("merge", recipe, tmp_path / "out", "--seed", "x")
    assert_one_line_error(done, "--seed")
    assert done.returncode == 2
    assert not (tmp_path / "out").exists()


def test_unknown_device_is_one_line(recipe, tmp_path):
    done = modelalloy("merge", recipe, tmp_path / "out", "--device", "tpu")
    assert_one_line_error(done, "tpu")
    assert done.returncode == 1
    assert not (tmp_path / "out").exists()


def test_unknown_command_and_option_are_one_line():
    assert_one_line_error(modelalloy("nosuch"), "nosuch")
    assert_one_line_error(modelalloy("methods", "--bogus"), "--bogus")


def test_usage_errors_do_not_need_click():
    """typer 0.29 no longer installs click: the error path must not import it."""
    block_click = textwrap.dedent("""
        import sys
        class NoClick:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'click':
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoClick())
        """)
    done = modelalloy("merge", prelude=block_click)
    assert_one_line_error(done, "Missing argument")


BLOCK_OPTIONAL = textwrap.dedent("""
    import sys
    class CoreInstall:
        # What `pip install modelalloy` lacks: the extras' packages are not importable.
        blocked = {'transformers', 'sklearn', 'matplotlib', 'lm_eval'}
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, CoreInstall())
    """)


@pytest.mark.parametrize("args", [
    ("bench", "--suite", "tiny-vision", "--size", "smoke", "--methods", "linear"),
    ("eval", "expert:invert", "--suite", "tiny-vision", "--size", "smoke"),
])
def test_core_install_names_the_bench_extra(args, tmp_path):
    done = modelalloy(*args, "--out", tmp_path / "o", prelude=BLOCK_OPTIONAL) \
        if args[0] == "bench" else modelalloy(*args, prelude=BLOCK_OPTIONAL)
    assert_one_line_error(done, "pip install 'modelalloy[bench]'")


def test_core_install_stats_names_an_extra(recipe, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    model = recipe.parent / "base"
    done = modelalloy("stats", model, "--data", data, "--kind", "gram",
                      "--out", tmp_path / "s", prelude=BLOCK_OPTIONAL)
    assert_one_line_error(done, "pip install", "modelalloy[", "transformers")


def _interrupt_while_merging(tmp_path: Path, sig: signal.Signals) -> subprocess.Popen[str]:
    base, *experts = plain_models(tmp_path, 3, tensors=40)
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.2}}"
                          "\nmodels:\n" + "".join(f"  - model: {e}\n" for e in experts))
    proc = subprocess.Popen([sys.executable, "-m", "modelalloy", "merge", recipe,
                             tmp_path / "out", "--threads", "1"], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.tmp*/*.safetensors")):
        assert proc.poll() is None, "merge finished before it could be interrupted"
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_merge_says_so_in_one_line_and_leaves_nothing(tmp_path, sig, code):
    proc = _interrupt_while_merging(tmp_path, sig)
    stderr = proc.stderr.read()
    assert proc.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and sig.name in lines[0], stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "the temporary output was left behind"

"""The engine hints the page cache about queued inputs, and the command exits quickly but
completely (exit code, flushed output, exit handlers, waiting threads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modelalloy import merge
from modelalloy.io.checkpoint import Checkpoint, open_checkpoint
from tests.conftest import subprocess_env, write_recipe


def _ta_recipe(tmp_path: Path, base: Path, experts: list[Path]) -> Path:
    return write_recipe(tmp_path / "r.yaml",
                        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                        + "".join(f"  - model: {e}\n" for e in experts))


def test_every_input_of_every_tensor_is_hinted(gpt2_family, tmp_path, monkeypatch):
    base, experts = gpt2_family
    hinted: list[tuple[Path, str]] = []
    real = Checkpoint.prefetch

    def spy(self: Checkpoint, name: str) -> bool:
        hinted.append((self.path, name))
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "prefetch", spy)
    merge(_ta_recipe(tmp_path, base, experts), tmp_path / "out", threads=2)
    with open_checkpoint(base) as ck:
        names = set(ck.names())
    for model in (base, *experts):
        assert {n for p, n in hinted if p == model} == names, model


def _run(code: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)


ENTRY = ("import atexit, sys\n"
         "atexit.register(lambda: print('exit handler ran', flush=True))\n"
         "class Late:\n    def __del__(self):\n        print('torn down', flush=True)\n"
         "late = Late()\n"
         "sys.argv = ['modelalloy', *sys.argv[1:]]\n"
         "from modelalloy.cli import entry\n"
         "entry()\n"
         "print('not reached')\n")


def test_quick_exit_keeps_the_exit_code_output_and_exit_handlers(gpt2_family, tmp_path):
    base, experts = gpt2_family
    done = _run(ENTRY, "merge", _ta_recipe(tmp_path, base, experts), tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "merged" in done.stdout and "exit handler ran" in done.stdout
    assert "not reached" not in done.stdout  # the process ended inside entry()
    assert "torn down" not in done.stdout  # ... without tearing the interpreter down
    assert (tmp_path / "out" / "model.safetensors").exists()

    failed = _run(ENTRY, "merge", tmp_path / "missing.yaml", tmp_path / "out2")
    assert failed.returncode == 1
    assert "missing.yaml" in failed.stderr and "exit handler ran" in failed.stdout
    assert not (tmp_path / "out2").exists()


def test_quick_exit_waits_for_a_running_thread(tmp_path):
    """With another non-daemon thread alive, the exit is the normal one: it finishes."""
    marker = tmp_path / "thread-finished"
    code = ("import threading, time, sys\n"
            f"def work():\n    time.sleep(0.5)\n    open({str(marker)!r}, 'w').close()\n"
            "threading.Thread(target=work).start()\n"
            "sys.argv = ['modelalloy', 'methods']\n"
            "from modelalloy.cli import entry\n"
            "entry()\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "linear" in done.stdout
    assert marker.exists()

"""Faults injected into real commands: kill -9 at seeded random points of the writes and at
every step of the commit, SIGINT, SIGTERM, and a full disk (injected at the fsync, and a real
small tmpfs where this process may mount one).

After every fault: the output is the complete new one or the complete old one (or absent when
there was none), the inputs are byte-identical, stderr is one line (for faults the process
can still report), and a rerun succeeds and leaves nothing else behind.

Faults are placed with ``MODELALLOY_FAULT`` (modelalloy/io/faults.py): the writer itself
kills or signals the process at the named point, so the fault lands exactly there.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import save_gpt2_family, subprocess_env, write_recipe
from tests.faults.helpers import tmpfs

SEED = 20261207
# Every case starts a command in a fresh interpreter (torch import: seconds each).
pytestmark = pytest.mark.slow


def tree_hash(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (hidden files included)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs (base, two experts, a bundle, a recipe) and each command's clean output."""
    root = tmp_path_factory.mktemp("faults")
    base, experts = save_gpt2_family(root, n_experts=2)
    recipe = write_recipe(root / "ties.yaml", f"merge_method: ties\nbase_model: {base}\n"
                          "parameters: {density: 0.5}\nmodels:\n" + "".join(
                              f"  - model: {e}\n" for e in experts))
    data = root / "data.jsonl"
    data.write_text("".join(f'{{"input_ids": [{i}, {i + 1}, {i + 2}]}}\n' for i in range(8)))
    w = {"root": root, "base": base, "experts": experts, "recipe": recipe, "data": data}
    done = _run(root, ["compress", base, *experts, "--out", root / "bundle"])
    assert done.returncode == 0, done.stderr
    w["bundle"] = root / "bundle"
    w["inputs"] = [base, *experts, w["bundle"], recipe, data]
    w["reference"] = {}
    for name, command in COMMANDS.items():
        out = root / f"reference-{name}{'.safetensors' if name == 'stats' else ''}"
        done = _run(root, command(w, out))
        assert done.returncode == 0, done.stderr
        w["reference"][name] = _hash(out)
    return w


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stats_hash(path: Path) -> str:
    """A statistics file by content: safetensors writes its metadata in hash-map order, so
    two writes of the same statistics differ in bytes."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(repr(sorted(f.metadata().items())).encode())
        for key in sorted(f.keys()):
            digest.update(key.encode() + f.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()


def _hash(path: Path) -> str:
    if path.is_dir():
        return tree_hash(path)
    return _stats_hash(path) if path.suffix == ".safetensors" else _file_hash(path)


COMMANDS = {
    "merge": lambda w, out: ["merge", w["recipe"], out, "--threads", "2"],
    "compress": lambda w, out: ["compress", w["base"], *w["experts"], "--out", out],
    "rebuild": lambda w, out: ["rebuild", w["bundle"], "--task", "1", "--out", out],
    "stats": lambda w, out: ["stats", w["base"], "--data", w["data"], "--kind", "gram",
                             "--out", out],
    "merge-stream": lambda w, out: ["merge-stream", w["base"], *w["experts"], "--out", out],
}
# The output's name per command (stats writes one file, the others a folder).
OUT_NAME = {"stats": "out.safetensors"}

_NO_EXCHANGE = ("import modelalloy.io.atomic_dir as a; a.rename2 = lambda *args: False; "
                "from modelalloy._entry import entry; entry()")


def _run(cwd: Path, args: list, fault: str | None = None, no_exchange: bool = False,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop("MODELALLOY_FAULT", None)
    if fault is not None:
        env["MODELALLOY_FAULT"] = fault
    head = [sys.executable, "-c", _NO_EXCHANGE] if no_exchange else \
        [sys.executable, "-m", "modelalloy"]
    return subprocess.run([*head, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _inputs_hash(w) -> list[str]:
    return [_hash(p) for p in w["inputs"]]


def _check_after_fault(w, name: str, out: Path, done, fault: str, old: str | None) -> None:
    """The output is complete (new or old) or absent; a signal is reported in one line."""
    action = fault.rsplit(":", 1)[-1]
    if action == "kill":
        assert done.returncode == -signal.SIGKILL or done.returncode == 0, done.stderr
    elif done.returncode != 0:
        lines = _our_lines(done.stderr)
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        if action in ("term", "int"):
            sig = signal.SIGTERM if action == "term" else signal.SIGINT
            assert done.returncode == 128 + sig and sig.name in lines[0], done.stderr
    if out.exists():
        assert _hash(out) in (w["reference"][name], old), f"{out} is neither new nor old"
    else:
        assert old is None, "the previous output was lost"


def _our_lines(stderr: str) -> list[str]:
    """stderr without transformers' own warnings about the tiny test model's config (its
    token ids lie outside the 64-token test vocabulary)."""
    return [line for line in stderr.strip().splitlines()
            if not line.startswith("[transformers]")]


def _rerun_and_check(w, name: str, out: Path, force: bool = False) -> None:
    args = COMMANDS[name](w, out) + (["--force"] if force else [])
    if out.exists() and not force:
        if name == "stats":
            pass  # stats replaces its file
        else:
            shutil.rmtree(out)  # compress/rebuild/merge-stream never replace an output
    done = _run(out.parent, args)
    assert done.returncode == 0, done.stderr
    assert _hash(out) == w["reference"][name]
    assert sorted(os.listdir(out.parent)) == [out.name], "a rerun left temporaries behind"


def _random_faults(count: int, salt: str) -> list[str]:
    rng = random.Random(f"{SEED}-{salt}")
    actions = ["kill", "kill", "term", "int"]
    return [f"writer.write#{rng.randint(1, 40)}:{rng.choice(actions)}" for _ in range(count)]


MERGE_FAULTS = [
    *_random_faults(2, "merge"),
    "output.created:kill",
    "writer.close:kill",
    "writer.close:enospc",
    "commit.begin:kill",
    "commit.begin:term",
    "commit.done:kill",
]


@pytest.mark.parametrize("fault", MERGE_FAULTS)
def test_merge_fault_without_previous_output(tmp_path, world, fault):
    before = _inputs_hash(world)
    out = tmp_path / "out"
    done = _run(tmp_path, COMMANDS["merge"](world, out), fault)
    _check_after_fault(world, "merge", out, done, fault, old=None)
    assert _inputs_hash(world) == before
    _rerun_and_check(world, "merge", out, force=out.exists())


@pytest.mark.parametrize("fault, no_exchange", [
    ("commit.exchanged:kill", False),
    ("commit.exchanged:term", False),
    ("commit.old-moved:kill", True),
    ("commit.old-moved:term", True),
    (_random_faults(1, "force")[0], False),
])
def test_forced_merge_fault_keeps_old_or_new(tmp_path, world, fault, no_exchange):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous output")
    old = tree_hash(out)
    done = _run(tmp_path, COMMANDS["merge"](world, out) + ["--force"], fault, no_exchange)
    if "old-moved:kill" in fault:
        # killed between the two renames: no folder at `out` until the next run finishes
        # the swap, which any modelalloy command touching `out` does first
        assert not out.exists() and done.returncode == -signal.SIGKILL
        from modelalloy.io import recover_leftovers

        with pytest.warns(UserWarning):
            recover_leftovers(out)
    _check_after_fault(world, "merge", out, done, fault, old=old)
    _rerun_and_check(world, "merge", out, force=True)


@pytest.mark.parametrize("name, fault", [
    ("compress", _random_faults(1, "compress")[0]),
    ("compress", "commit.begin:kill"),
    ("rebuild", _random_faults(1, "rebuild")[0]),
    ("rebuild", "commit.done:kill"),
    ("merge-stream", _random_faults(1, "stream")[0]),
    ("merge-stream", "commit.begin:term"),
    ("stats", "stats.save:kill"),
    ("stats", "stats.save:int"),
])
def test_other_commands_faults(tmp_path, world, name, fault):
    before = _inputs_hash(world)
    out = tmp_path / OUT_NAME.get(name, "out")
    done = _run(tmp_path, COMMANDS[name](world, out), fault)
    _check_after_fault(world, name, out, done, fault, old=None)
    assert _inputs_hash(world) == before
    _rerun_and_check(world, name, out)


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KB tmpfs."""
    with tmpfs(tmp_path / "disk", "200k") as mount:
        yield mount


@pytest.mark.parametrize("name", ["merge", "stats", "rebuild"])
def test_full_disk_is_one_line_and_leaves_nothing(small_disk, world, name):
    out = small_disk / OUT_NAME.get(name, "out")
    (small_disk / "filler").write_bytes(b"\0" * 150_000)  # another process filled the disk
    before = _inputs_hash(world)
    done = _run(small_disk, COMMANDS[name](world, out))
    assert done.returncode == 1, done.stderr
    lines = _our_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(out) in lines[0] and ".tmp-" not in lines[0], lines[0]
    assert "0.00 GB" not in lines[0] and " KB" in lines[0], lines[0]
    assert sorted(os.listdir(small_disk)) == ["filler"]
    assert _inputs_hash(world) == before

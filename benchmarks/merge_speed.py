#!/usr/bin/env python
"""Merge speed and memory: `modelalloy merge` against `mergekit-yaml`, side by side.

What it does, for each size (``--sizes``) and merge method (``--methods``):

1. Generates (once, cached under ``--cache-dir``) a synthetic Llama-architecture base model and
   three "fine-tuned" experts: bf16, sharded safetensors, an HF ``config.json`` and shard index.
   The experts are the base plus small structured deltas (a shared low-rank direction, a
   per-expert low-rank direction and row-scaled noise), so sparsification and sign election have
   something realistic to do. Nothing is ever materialised in float32 beyond one tensor.
2. Writes the same mergekit-style YAML recipe for both tools.
3. Runs both tools ``--runs`` times, interleaved (modelalloy, mergekit, modelalloy, ...), each in
   its own process. Wall time is taken from the parent; peak RSS (the kernel's ``VmHWM``) and
   peak anonymous RSS (``RssAnon``, i.e. without page-cache pages of memory-mapped inputs) are
   polled from ``/proc/PID/status``.
4. Measures the I/O lower bound on the same machine: bytes read (the input shards the recipe
   uses) ÷ read bandwidth + bytes written (the output) ÷ write bandwidth.
5. Compares the outputs of the two tools (max abs difference, share of elements more than one
   bf16 ulp apart, and for linear/task_arithmetic each tool's error against a float64 reference).
6. Runs modelalloy under ``--memory-budget`` and reports peak RSS against the budget.
   Before any timed run, each method merges the 2M models once, untimed, so that numba's
   on-disk cache holds the fused kernels (compiled on first use, as a second merge finds them).
7. Runs ``--cold-methods`` (default linear and task_arithmetic) again for both tools with the
   recipe's input shards dropped from the page cache before every run, so every byte comes
   from the disk, as when models are larger than RAM; the bound there uses the best cold read
   bandwidth of 1, 2 or 4 concurrent readers. ``--cold-only`` adds just these rows to a size
   already measured.
8. Stores every measurement in a JSON file (``--results``, sizes run separately accumulate) and
   renders the section "Merge speed and memory against mergekit" of ``--out``
   (docs/performance.md); other sections of that file are left as they are.

mergekit is never a dependency of modelalloy: install it into its own virtual environment and
point the script at it with ``--mergekit-bin`` or ``MERGEKIT_YAML``; by default it looks for
``mergekit-yaml`` on PATH and in ``../venv-mergekit/bin`` next to the repository. Without it,
the mergekit columns are skipped with the reason printed.

Usage::

    python benchmarks/merge_speed.py --sizes 100M --runs 3
    python benchmarks/merge_speed.py --sizes 1B --runs 3 --methods linear,ties
    MERGEKIT_YAML=/path/venv/bin/mergekit-yaml make bench-speed
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Merge speed and memory against mergekit"
ALL_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs",
               "breadcrumbs_ties", "slerp"]
# more mergekit methods, run when named in --methods (no target in issue 6)
MORE_METHODS = ["model_stock", "della"]
KNOWN_METHODS = ALL_METHODS + MORE_METHODS
TARGETS = {"linear": 3, "task_arithmetic": 3, "slerp": 3, "ties": 8, "dare_ties": 8,
           "breadcrumbs": 8, "breadcrumbs_ties": 8}  # median speed-up over mergekit asked
# for by issues 6 and 21, at ~1B
DETERMINISTIC = {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                 "slerp", "model_stock"}
GEN_VERSION = 1  # bump when the synthetic models change, so cached ones are regenerated


# --------------------------------------------------------------------------------------------
# Synthetic Llama checkpoints
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in HF Llama order; untied lm_head."""
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * hd
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab, "max_position_embeddings": 2048, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "use_cache": True,
        }


SIZES: dict[str, LlamaShape] = {
    # ~1.8M parameters: for the test and smoke runs.
    "2M": LlamaShape(hidden=128, intermediate=344, layers=4, heads=4, kv_heads=2, vocab=4096),
    # ~99M parameters.
    "100M": LlamaShape(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4,
                       vocab=32000),
    # ~1.01B parameters (TinyLlama widths, 20 layers).
    "1B": LlamaShape(hidden=2048, intermediate=5632, layers=20, heads=32, kv_heads=8,
                     vocab=32000),
    # ~3.0B parameters (Llama-3.2-3B widths, 28 layers, a 32K vocabulary): base + 3 experts
    # are 24 GB of bf16, more than a 24 GB machine's page cache holds.
    "3B": LlamaShape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8,
                     vocab=32000),
}
# Sizes whose four models do not fit in RAM: cold runs only (a warm page cache cannot hold
# them), the issue's four methods, and the models are deleted after the run (--keep-models).
LARGER_THAN_RAM = {"3B"}
LARGE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _finish_model(folder: Path, shape: LlamaShape, shard_names: list[list[str]],
                  total_size: int) -> None:
    """Rename the shards written as part-K to model-K-of-N and write config and index."""
    total = len(shard_names)
    weight_map = {}
    for k, names in enumerate(shard_names, 1):
        fname = f"model-{k:05d}-of-{total:05d}.safetensors"
        (folder / f"part-{k:05d}.safetensors").rename(folder / fname)
        weight_map.update(dict.fromkeys(names, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")


def generate_models(size: str, cache_dir: Path, log=print) -> dict[str, Path]:
    """Base + 3 experts for ``size`` under ``cache_dir``; reused when already complete.

    Tensor by tensor, each shard written as soon as it is full: memory holds one shard per
    model (about a quarter of a model) plus one float32 tensor at a time.
    """
    import torch
    from safetensors.torch import save_file

    shape = SIZES[size]
    root = cache_dir / f"llama-{size}-v{GEN_VERSION}"
    names = ["base", "expert1", "expert2", "expert3"]
    paths = {n: root / n for n in names}
    stamp = root / "COMPLETE.json"
    meta = {"version": GEN_VERSION, "shape": shape.__dict__, "params": shape.params}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return paths
    if root.exists():
        shutil.rmtree(root)
    for p in paths.values():
        p.mkdir(parents=True)
    log(f"[gen] generating {size} ({shape.params / 1e6:.1f}M parameters, bf16) x4 in {root}")
    t0 = time.perf_counter()
    shard_bytes = max(1 << 20, shape.params * 2 // 4)  # about four shards per model
    pending: dict[str, dict] = {n: {} for n in names}
    shard_names: list[list[str]] = []
    filled = 0
    nexp = 3

    def flush() -> None:
        k = len(shard_names) + 1
        for n_ in names:
            save_file(pending[n_], str(paths[n_] / f"part-{k:05d}.safetensors"),
                      metadata={"format": "pt"})
        shard_names.append(list(pending["base"]))
        for n_ in names:
            pending[n_] = {}

    for name, shp in shape.tensors():
        g = torch.Generator().manual_seed(_seed("base", name))
        if len(shp) == 1:  # RMSNorm gains: around 1
            base = 1.0 + 0.05 * torch.randn(shp, generator=g)
        else:
            base = 0.02 * torch.randn(shp, generator=g)
        nbytes = base.numel() * 2
        if filled and filled + nbytes > shard_bytes:
            flush()
            filled = 0
        pending["base"][name] = base.to(torch.bfloat16)
        if len(shp) == 2:
            m, n = shp
            gs = torch.Generator().manual_seed(_seed("shared", name))
            shared = (torch.randn(m, 2, generator=gs) @ torch.randn(2, n, generator=gs)) * 1e-3
        for e in range(nexp):
            ge = torch.Generator().manual_seed(_seed("expert", e, name))
            if len(shp) == 2:
                m, n = shp
                rows = torch.exp(0.5 * torch.randn(m, 1, generator=ge))
                delta = torch.randn(shp, generator=ge).mul_(rows).mul_(6e-4)
                delta.addmm_(torch.randn(m, 2, generator=ge), torch.randn(2, n, generator=ge),
                             alpha=8e-4)
                delta.add_(shared)
            else:
                delta = 0.01 * torch.randn(shp, generator=ge)
            pending[f"expert{e + 1}"][name] = delta.add_(base).to(torch.bfloat16)
            del delta
        filled += nbytes
    flush()
    total = shape.params * 2
    for n_ in names:
        _finish_model(paths[n_], shape, shard_names, total)
    stamp.write_text(json.dumps(meta))
    log(f"[gen] done in {time.perf_counter() - t0:.1f}s")
    return paths


def model_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def models_root(size: str, cache_dir: Path) -> Path:
    return cache_dir / f"llama-{size}-v{GEN_VERSION}"


def disk_needed(size: str, cache_dir: Path, work: Path) -> dict[Path, int]:
    """Free bytes each folder needs for a run of ``size``: the four models (unless already
    generated) in ``cache_dir``; one output at a time and the I/O floor's file of the same
    size in ``work`` (outputs are deleted after each run); 5% spare. Folders on the same
    file system are added up under the first."""
    model = SIZES[size].params * 2  # bf16
    need: dict[Path, int] = {}
    complete = (models_root(size, cache_dir) / "COMPLETE.json").exists()
    for folder, nbytes in ((cache_dir, 0 if complete else 4 * model), (work, 2 * model)):
        folder = _existing(folder)
        same = next((f for f in need if f.stat().st_dev == folder.stat().st_dev), folder)
        need[same] = need.get(same, 0) + nbytes
    return {f: int(n * 1.05) for f, n in need.items() if n}


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest existing parent (where it will be created)."""
    folder = folder.resolve()
    while not folder.exists():
        folder = folder.parent
    return folder


def check_disk(size: str, cache_dir: Path, work: Path) -> None:
    """Refuse a size whose models and outputs would not fit on the disk, before generating
    anything, with the space it needs."""
    for folder, need in disk_needed(size, cache_dir, work).items():
        free = shutil.disk_usage(folder).free
        if free < need:
            raise SystemExit(
                f"--sizes {size}: needs {need / 1e9:.1f} GB free in {folder} (four models of "
                f"{SIZES[size].params * 2 / 1e9:.1f} GB unless already generated, one output "
                f"and the I/O floor's file of the same size) but {free / 1e9:.1f} GB are free; "
                "free space or point --cache-dir / --work-dir at a larger disk")


# --------------------------------------------------------------------------------------------
# Recipes (mergekit YAML that both tools accept)
# --------------------------------------------------------------------------------------------

def recipe_yaml(method: str, models: dict[str, Path]) -> str:
    b, e = str(models["base"]), [str(models[f"expert{i}"]) for i in (1, 2, 3)]

    def entries(params: dict[str, object] | None) -> str:
        lines = []
        for p in e:
            lines.append(f"  - model: {p}")
            if params:
                inner = ", ".join(f"{k}: {v}" for k, v in params.items())
                lines.append(f"    parameters: {{{inner}}}")
        return "\n".join(lines)

    if method == "linear":
        body = ("merge_method: linear\nmodels:\n"
                + "\n".join(f"  - model: {p}\n    parameters: {{weight: {w}}}"
                            for p, w in zip(e, (0.5, 0.3, 0.2), strict=True))
                + "\nparameters: {normalize: true}\n")
    elif method == "task_arithmetic":
        body = (f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
                + entries({"weight": 0.5}) + "\n")
    elif method == "ties":
        body = (f"merge_method: ties\nbase_model: {b}\nmodels:\n"
                + entries({"weight": 1.0, "density": 0.2}) + "\nparameters: {normalize: true}\n")
    elif method == "dare_ties":
        body = (f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n"
                + entries({"weight": 0.5, "density": 0.2}) + "\n")
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        body = (f"merge_method: {method}\nbase_model: {b}\nmodels:\n"
                + entries({"weight": 0.5, "density": 0.2, "gamma": 0.01}) + "\n")
    elif method == "slerp":
        body = (f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n"
                f"  - model: {e[0]}\nparameters: {{t: 0.5}}\n")
    elif method == "model_stock":
        body = f"merge_method: model_stock\nbase_model: {b}\nmodels:\n" + entries(None) + "\n"
    elif method == "della":  # the official README's density 0.7, epsilon 0.07
        body = (f"merge_method: della\nbase_model: {b}\nmodels:\n"
                + entries({"weight": 0.5, "density": 0.7, "epsilon": 0.07}) + "\n")
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(KNOWN_METHODS)}")
    return body + "dtype: bfloat16\n"


def recipe_inputs(method: str, models: dict[str, Path]) -> list[Path]:
    if method == "linear":
        return [models[f"expert{i}"] for i in (1, 2, 3)]
    if method == "slerp":
        return [models["base"], models["expert1"]]
    return [models["base"]] + [models[f"expert{i}"] for i in (1, 2, 3)]


# --------------------------------------------------------------------------------------------
# Running a process and measuring it from outside
# --------------------------------------------------------------------------------------------

def _proc_status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _proc_io(pid: int) -> dict[str, int]:
    """``/proc/PID/io`` counters of the whole process (all its threads, live and exited):
    ``read_bytes`` is what it made the kernel fetch from the block device (page-cache misses,
    memory-mapped page faults and readahead included), ``rchar`` what its read calls
    returned, ``write_bytes`` what it sent towards the disk."""
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path,
                 timeout: float) -> dict:
    """Run ``cmd``: wall seconds, peak RSS and peak anonymous RSS, measured from outside.

    Peak RSS is the process's ``VmHWM`` (the kernel's high-water mark of its resident set),
    polled every 20 ms from ``/proc/PID/status``. The rusage ``ru_maxrss`` that ``wait4``
    returns is not used: Linux carries the *parent's* high-water mark into a child across
    fork/vfork + exec, so a benchmark process that has itself held tensors would inflate it.
    ``VmHWM`` belongs to the memory map that exec creates, so it is the tool's alone.

    Every run starts on a quiet disk (``os.sync`` first, untimed): mergekit leaves its output
    in the page cache, and without this the kernel wrote it back during the next run, whose
    own writes and fsync then queued behind it (1B linear: 3.1–4.4 s against 3.0–3.1 s).
    """
    os.sync()
    with open(log_path, "wb") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=str(REPO))
        peak_anon = peak_file = hwm = 0
        status = None
        deadline = t0 + timeout
        io: dict[str, int] = {}
        while True:
            # exited but not yet reaped: its /proc entry still holds the final I/O counters
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                io = _proc_io(proc.pid) or io
                _, status, ru = os.wait4(proc.pid, 0)
                break
            io = _proc_io(proc.pid) or io
            s = _proc_status_kb(proc.pid)
            peak_anon = max(peak_anon, s.get("RssAnon", 0))
            peak_file = max(peak_file, s.get("RssFile", 0))
            hwm = max(hwm, s.get("VmHWM", 0))
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log_path.read_text(errors="replace")[-2000:]
    return {"wall_s": wall, "rc": proc.returncode, "peak_rss_mb": hwm / 1024,
            "peak_anon_mb": peak_anon / 1024, "peak_file_mb": peak_file / 1024,
            "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "disk_read_bytes": io.get("read_bytes"), "disk_write_bytes": io.get("write_bytes"),
            "rchar": io.get("rchar"),
            "timed_out": wall >= timeout, "log_tail": tail if proc.returncode else ""}


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------

# One finder for every script (benchmarks/mergekit_bin.py: --mergekit-bin, MERGEKIT_YAML, PATH,
# the documented ../venv-mergekit); candidate_cost.py imports it from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_bin import find_mergekit  # noqa: E402


def mergekit_version(binary: str) -> str:
    py = Path(binary).parent / "python"
    if py.exists():
        r = subprocess.run([str(py), "-c", "import importlib.metadata as m;"
                            "print(m.version('mergekit'), m.version('torch'))"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            mk, tv = r.stdout.split()
            return f"mergekit {mk} (torch {tv})"
    return "mergekit (version unknown)"


def modelalloy_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def modelalloy_available(cmd: list[str]) -> tuple[bool, str]:
    r = subprocess.run(cmd + ["--help"], env=modelalloy_env(),
                       capture_output=True, text=True, cwd=str(REPO))
    if r.returncode != 0:
        return False, ("`modelalloy merge` is not available yet: "
                       + (r.stderr.strip().splitlines() or ["?"])[-1])
    return True, "ok"


# --------------------------------------------------------------------------------------------
# I/O bandwidth on this machine
# --------------------------------------------------------------------------------------------

def _read_files(paths: list[Path], buf: bytearray) -> int:
    mv = memoryview(buf)
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                n += k
    return n


def _drop_cache(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache. ``DONTNEED`` drops clean pages only: the
    files are flushed first, or the pages of models generated moments ago stay cached and the
    first cold measurement after generating reads part of them from memory."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure_bandwidth(models: dict[str, Path], work: Path) -> dict:
    """Read bandwidth (warm and cold) on the model shards, write bandwidth on a file of the
    same size as one model (buffered, as the tools write, and with fsync)."""
    buf = bytearray(64 << 20)
    files = [f for k in ("expert2", "expert3") for f in model_files(models[k])]
    # cold: ask the kernel to drop these (clean) pages first; works without root for pages
    # no process has mapped. Then warm: read the same files again from the page cache.
    _drop_cache(files)
    t0 = time.perf_counter()
    n = _read_files(files, buf)
    cold = n / (time.perf_counter() - t0)
    best_warm = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        n = _read_files(files, buf)
        best_warm = max(best_warm, n / (time.perf_counter() - t0))
    return {"read_cold_Bps": cold, "read_warm_Bps": best_warm,
            **measure_write(folder_bytes(models["base"]), work)}


def measure_write(size: int, work: Path) -> dict:
    """Write bandwidth on a file of ``size`` bytes, buffered and including fsync; best of
    three (the bound is what the machine can do at its best)."""
    target = work / "bandwidth.tmp"
    chunk = os.urandom(min(64 << 20, size))
    best_buf = best_sync = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        written = 0
        with open(target, "wb", buffering=0) as f:
            while written < size:
                written += f.write(chunk[: min(len(chunk), size - written)])
            t_buf = time.perf_counter() - t0
            os.fsync(f.fileno())
        t_sync = time.perf_counter() - t0
        target.unlink()
        best_buf, best_sync = max(best_buf, written / t_buf), max(best_sync, written / t_sync)
    return {"write_buffered_Bps": best_buf, "write_fsync_Bps": best_sync, "probe_bytes": size}


def measure_cold_read(models: dict[str, Path], streams: int, work: Path) -> float:
    """Cold read bandwidth with ``streams`` readers at once (each its own files), after
    dropping the files' pages: a disk often delivers more to several readers than to one, and
    a merge reads several models at once. :func:`io_floor` with nothing to write."""
    files = [f for k in ("expert2", "expert3") for f in model_files(models[k])]
    seconds = io_floor(files, 0, work, streams, durable=False)
    return sum(f.stat().st_size for f in files) / seconds


def warm_inputs(models: dict[str, Path]) -> None:
    buf = bytearray(64 << 20)
    _read_files([f for p in models.values() for f in model_files(p)], buf)


# --------------------------------------------------------------------------------------------
# Output comparison
# --------------------------------------------------------------------------------------------

def _tensors(folder: Path):
    from safetensors import safe_open

    for f in model_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)


def _open_all(folder: Path) -> dict[str, tuple[Path, str]]:
    from safetensors import safe_open

    where = {}
    for f in model_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                where[k] = (f, k)
    return where


def _get(where: dict, name: str):
    from safetensors import safe_open

    f, k = where[name]
    with safe_open(str(f), framework="pt") as h:
        return h.get_tensor(k)


def _bf16_ulp(x):
    import torch

    a = x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def reference_linear(method: str, models: dict[str, Path]):
    """Float64 reference of linear / task_arithmetic for the recipes above, per tensor."""

    ws = {"linear": (0.5, 0.3, 0.2), "task_arithmetic": (0.5, 0.5, 0.5)}[method]
    wheres = {k: _open_all(v) for k, v in models.items()}

    def ref(name: str):
        ex = [_get(wheres[f"expert{i}"], name).double() for i in (1, 2, 3)]
        if method == "linear":
            return sum(w * t for w, t in zip(ws, ex, strict=True)) / sum(ws)
        b = _get(wheres["base"], name).double()
        return b + sum(w * (t - b) for w, t in zip(ws, ex, strict=True))

    return ref


def compare_outputs(ours: Path, theirs: Path, method: str,
                    models: dict[str, Path]) -> dict:
    import torch

    a_where, b_where = _open_all(ours), _open_all(theirs)
    names = sorted(set(a_where) & set(b_where))
    only = sorted(set(a_where) ^ set(b_where))
    ref = reference_linear(method, models) if method in ("linear", "task_arithmetic") else None
    max_abs = 0.0
    worst = None
    max_val = 0.0
    n_total = n_ulp = n_diff = 0
    err_ours = err_theirs = 0.0
    n_ref = exact_ours = exact_theirs = 0
    dtypes = set()
    for name in names:
        a, b = _get(a_where, name), _get(b_where, name)
        dtypes.add((str(a.dtype).replace("torch.", ""), str(b.dtype).replace("torch.", "")))
        if a.shape != b.shape:
            only.append(f"{name} (shape {tuple(a.shape)} vs {tuple(b.shape)})")
            continue
        af, bf = a.float(), b.float()
        d = (af - bf).abs()
        if d.max().item() > max_abs:
            max_abs, worst = d.max().item(), name
        max_val = max(max_val, bf.abs().max().item())
        ulp = _bf16_ulp(torch.maximum(af.abs(), bf.abs()))
        n_total += d.numel()
        n_diff += int((d > 0).sum())
        n_ulp += int((d > ulp).sum())
        if ref is not None:
            r = ref(name)
            rb = r.to(torch.bfloat16)  # the correctly rounded exact result
            ea, eb = (a.double() - r).abs(), (b.double() - r).abs()
            err_ours, err_theirs = max(err_ours, ea.max().item()), max(err_theirs, eb.max().item())
            n_ref += r.numel()
            exact_ours += int((a == rb).sum())
            exact_theirs += int((b == rb).sum())
    out = {"tensors": len(names), "mismatched_names": only[:5], "n_mismatched": len(only),
           "max_abs_diff": max_abs, "worst_tensor": worst, "max_abs_value": max_val,
           "frac_differ": n_diff / max(n_total, 1), "frac_gt_1ulp": n_ulp / max(n_total, 1),
           "dtypes": sorted(dtypes)}
    if ref is not None:
        out.update({"ours_max_err_vs_fp64": err_ours, "mergekit_max_err_vs_fp64": err_theirs,
                    "ours_correctly_rounded": exact_ours / max(n_ref, 1),
                    "mergekit_correctly_rounded": exact_theirs / max(n_ref, 1)})
    return out


# --------------------------------------------------------------------------------------------
# Component micro-profile: where a merge's time can go on this machine
# --------------------------------------------------------------------------------------------

def profile_components(models: dict[str, Path], work: Path, density: float = 0.2) -> dict:
    """Floor cost of each stage, run the simple way on the real files: reading every tensor of
    base + 3 experts (warm cache), bf16 -> fp32 casts, the arithmetic of a linear merge, TIES
    trimming by full sort (mergekit), by kthvalue and by topk, the cast back, and writing.
    ``torch.get_num_threads()`` threads (the machine's cores)."""
    import torch
    from safetensors.torch import save_file

    names = ["base", "expert1", "expert2", "expert3"]
    wheres = {k: _open_all(models[k]) for k in names}
    tensor_names = sorted(wheres["base"])
    t = dict.fromkeys(("read", "cast_up", "linear_math", "sort_trim", "kthvalue_trim",
                       "topk_trim", "cast_down", "write"), 0.0)
    out_dir = work / "profile-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, object] = {}
    pending_bytes = 0
    shard = 0

    def flush():
        nonlocal pending, pending_bytes, shard
        if pending:
            t0 = time.perf_counter()
            save_file(pending, str(out_dir / f"s{shard}.safetensors"))
            t["write"] += time.perf_counter() - t0
            shard += 1
            pending, pending_bytes = {}, 0

    sample_numel = 0
    for name in tensor_names:
        t0 = time.perf_counter()
        raw = [_get(wheres[k], name) for k in names]
        t["read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        f32 = [x.float() for x in raw]
        t["cast_up"] += time.perf_counter() - t0
        base, experts = f32[0], f32[1:]
        t0 = time.perf_counter()
        acc = torch.zeros_like(base)
        for x in experts:
            acc.add_(x, alpha=1 / 3)
        t["linear_math"] += time.perf_counter() - t0
        deltas = [x.sub_(base) for x in experts]
        k = max(1, int(density * base.numel()))
        if base.dim() == 2:
            sample_numel += base.numel()
            for d in deltas:
                flat = d.abs().flatten()
                t0 = time.perf_counter()
                torch.argsort(flat, descending=True)
                t["sort_trim"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.kthvalue(flat, flat.numel() - k + 1)
                t["kthvalue_trim"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                torch.topk(flat, k, sorted=False)
                t["topk_trim"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = acc.to(torch.bfloat16)
        t["cast_down"] += time.perf_counter() - t0
        pending[name] = merged
        pending_bytes += merged.numel() * 2
        if pending_bytes > 512 << 20:
            flush()
    flush()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": t, "threads": torch.get_num_threads(),
            "trim_numel_per_model": sample_numel}


# --------------------------------------------------------------------------------------------
# Rendering docs/performance.md
# --------------------------------------------------------------------------------------------

def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x: float | None, spec: str = ".1f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


FINDINGS = Path(__file__).resolve().parent / "results" / "merge_speed_findings.md"


def _method_order(name: str) -> int:
    return KNOWN_METHODS.index(name) if name in KNOWN_METHODS else len(KNOWN_METHODS)


def render_section(results: dict, findings: Path | None = FINDINGS) -> str:
    L: list[str] = [SECTION, ""]
    L.append("Measured by `benchmarks/merge_speed.py` (generated from its results file; rerun it "
             "rather than editing the numbers by hand). Synthetic Llama-architecture checkpoints, "
             "bf16, sharded safetensors: a base and three experts (base + small structured "
             "deltas). Both tools run the same mergekit YAML recipe, each in its own process, "
             "interleaved run by run; times are wall clock from the parent process and include "
             "interpreter start-up and imports.")
    L.append("")
    for size in sorted(results.get("sizes", {}), key=lambda s: SIZES[s].params
                       if s in SIZES else 0):
        r = results["sizes"][size]
        env = r["env"]
        L.append(f"### {size}: {r['params'] / 1e6:,.0f}M parameters per model, "
                 f"{_gb(r['model_bytes'])} per model")
        L.append("")
        L.append(f"- Measured {env['date']} on {env['machine']}; load average before/after "
                 f"the runs: {env['load_before']} / {env['load_after']}; {env['runs']} "
                 f"run{'s' if env['runs'] != 1 else ''} per tool and method.")
        L.append(f"- modelalloy: `{env['modelalloy_cmd']}` (commit {env['commit']}); "
                 f"mergekit: {env['mergekit']}.")
        if env.get("cpu"):
            L.append(f"- CPU: {env['cpu']}.")
        if r.get("larger_than_ram"):
            L.extend(render_larger_than_ram(r))
            continue
        bw = r["bandwidth"]
        L.append(f"- I/O on this machine: read {bw['read_warm_Bps'] / 1e9:.2f} GB/s from the "
                 f"page cache (cold, after `posix_fadvise(DONTNEED)`: "
                 f"{bw['read_cold_Bps'] / 1e9:.2f} GB/s), write "
                 f"{bw['write_buffered_Bps'] / 1e9:.2f} GB/s buffered "
                 f"({bw['write_fsync_Bps'] / 1e9:.2f} GB/s including fsync), measured on "
                 f"files of {_gb(bw['probe_bytes'])}. Inputs are read once before timing, so "
                 "every run reads warm from the page cache (there is RAM for all of them); the "
                 "I/O bound below is bytes read ÷ warm read bandwidth + bytes written ÷ "
                 "buffered write bandwidth, the floor for both tools. modelalloy also fsyncs "
                 "its shards before it renames the output folder into place (a finished merge "
                 "is on disk, not only in the page cache); mergekit does not. The durable "
                 "bound takes the write bandwidth including fsync instead: the floor of a "
                 "merge that is on disk when it returns.")
        L.append("")
        L.append("| method | modelalloy median s | mergekit median s | speed-up (median of "
                 "per-run ratios) | target at 1B (issues 6, 21) | per-run ratios | peak RSS "
                 "modelalloy | peak RSS mergekit | I/O bound s, buffered / durable | "
                 "modelalloy ÷ I/O bound, buffered / durable |")
        L.append("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
        earlier: dict[tuple, list[str]] = {}
        first_date: dict[tuple, str] = {}
        for method, m in sorted(r["methods"].items(), key=lambda kv: _method_order(kv[0])):
            when = m.get("measured")
            mark = ""
            if when and when.get("run") != env.get("run"):
                # one mark per earlier run of the script (its methods ran minutes apart)
                key = (when.get("run") or when["date"], when["commit"], when["runs"],
                       when["load_before"])
                first_date.setdefault(key, when["date"])
                mark = "†" * (list(earlier).index(key) + 1 if key in earlier
                              else len(earlier) + 1)
                earlier.setdefault(key, []).append(method)
            ours = [x["wall_s"] for x in m["modelalloy"] if x["rc"] == 0]
            theirs = [x["wall_s"] for x in m.get("mergekit", []) if x["rc"] == 0]
            ratios = [b["wall_s"] / a["wall_s"] for a, b in
                      zip(m["modelalloy"], m.get("mergekit", []), strict=False)
                      if a["rc"] == 0 and b["rc"] == 0]
            rss_o = max((x["peak_rss_mb"] for x in m["modelalloy"] if x["rc"] == 0),
                        default=None)
            rss_t = max((x["peak_rss_mb"] for x in m.get("mergekit", []) if x["rc"] == 0),
                        default=None)
            anon_o = max((x["peak_anon_mb"] for x in m["modelalloy"] if x["rc"] == 0),
                         default=None)
            anon_t = max((x["peak_anon_mb"] for x in m.get("mergekit", []) if x["rc"] == 0),
                         default=None)
            mo, mt = _med(ours), _med(theirs)
            failed = [x for x in m["modelalloy"] if x["rc"] != 0]
            mo_s = _fmt(mo, ".2f") if ours else f"failed (rc {failed[0]['rc']})"
            if m.get("mergekit_skipped"):
                mt_s = "skipped"
            else:
                bad = [x for x in m.get("mergekit", []) if x["rc"] != 0]
                mt_s = _fmt(mt, ".2f") if theirs else (f"failed (rc {bad[0]['rc']})"
                                                        if bad else "—")
            L.append(
                f"| {method}{mark} | {mo_s} | {mt_s} | {_fmt(_med(ratios), '.2f')}"
                f"{'×' if ratios else ''} | "
                + (f"≥ {TARGETS[method]}×" if method in TARGETS else "—")
                + (" (met)" if ratios and _med(ratios) >= TARGETS.get(method, math.inf)
                   else "")
                + f" | {', '.join(f'{x:.2f}' for x in ratios) or '—'} | "
                f"{_fmt(rss_o, '.0f')} MB ({_fmt(anon_o, '.0f')} anon) | "
                f"{_fmt(rss_t, '.0f')} MB" + (f" ({_fmt(anon_t, '.0f')} anon)" if rss_t else "")
                + f" | {_bounds(m)} | {_bounds(m, mo)} |")
        L.append("")
        for i, (key, names) in enumerate(earlier.items()):
            _, commit, runs, load = key
            L.append(f"{'†' * (i + 1)} {', '.join(names)}: measured in an earlier run, "
                     f"{first_date[key]}, "
                     f"commit {commit}, {runs} run{'s' if runs != 1 else ''} per tool, load "
                     f"before {load}.")
            L.append("")
        L.append("Peak RSS is the kernel's high-water mark `VmHWM` of each process, polled "
                 "every 20 ms from `/proc/PID/status` (not `ru_maxrss`, which Linux inflates "
                 "with the parent's own peak across fork + exec); it counts the page-cache "
                 "pages of memory-mapped input shards that the process touched. \"anon\" is "
                 "the peak of `RssAnon` from the same polls: the memory the process really "
                 "allocated. A bare "
                 f"`python -c '{r.get('baseline_code', OLD_BASELINE_CODE)}'` peaks at "
                 f"{_fmt(r.get('baseline_rss_mb'), '.0f')} MB and takes "
                 f"{_fmt(r.get('baseline_wall_s'), '.1f')} s; importing mergekit's CLI takes "
                 f"{_fmt(r.get('mergekit_baseline_wall_s'), '.1f')} s: start-up is part of "
                 "every time above, and dominates at small sizes.")
        L.append("")
        if r.get("cold"):
            L.extend(render_cold(r["cold"]))
        if r.get("skip_reasons"):
            for why in r["skip_reasons"]:
                L.append(f"- Skipped: {why}")
            L.append("")
        if r.get("budgets"):
            L.append(f"**`--memory-budget` runs ({size})**")
            L.append("")
            L.append("| method | budget | wall s | peak RSS | peak anon RSS | peak RSS within "
                     "budget? | peak anon RSS within budget? |")
            L.append("|---|---:|---:|---:|---:|---|---|")
            for b in r["budgets"]:
                x = b["run"]
                if x["rc"] != 0:
                    need = re.search(r"use at least (\S+?GB)", x.get("log_tail", ""))
                    what = (f"refused up front (the largest tensor's working set needs at "
                            f"least {need.group(1)})" if need else f"failed (rc {x['rc']})")
                    L.append(f"| {b['method']} | {b['budget']} | {what} | | | | |")
                    continue
                budget_mb = b["budget_bytes"] / 2**20

                def verdict(v: float, budget_mb: float = budget_mb) -> str:
                    return (f"yes ({100 * v / budget_mb:.0f}%)" if v <= budget_mb
                            else f"**no** ({100 * v / budget_mb:.0f}%)")

                L.append(f"| {b['method']} | {b['budget']} | {x['wall_s']:.2f} | "
                         f"{x['peak_rss_mb']:.0f} MB | {x['peak_anon_mb']:.0f} MB | "
                         f"{verdict(x['peak_rss_mb'])} | {verdict(x['peak_anon_mb'])} |")
            L.append("")
            L.append("Budgets are read as the CLI reads them (1GB = 10^9 bytes); percentages "
                     "are of the budget. Peak RSS counts page-cache pages of mapped inputs, "
                     "which the kernel can drop; anon RSS does not.")
            when: dict[tuple[str, str], list[str]] = {}
            for b in r["budgets"]:
                if m := b.get("measured"):  # rows of a `--budgets-only` run
                    when.setdefault((m["date"][:10], m["commit"]), []).append(
                        f"{b['method']} {b['budget']} at {m['date'][11:]}, load "
                        f"{m['load_before']}")
            for (day, commit), rows in sorted(when.items()):
                L.append(f"Measured by `--budgets-only` on {day}, commit {commit}, 1 run "
                         f"each: {'; '.join(rows)}.")
            L.append("")
        if r.get("compare"):
            L.append(f"**Outputs compared ({size}, last run of each tool)**")
            L.append("")
            L.append("| method | max abs diff (in tensor) | largest value | elements that differ | "
                     "elements > 1 bf16 ulp apart | against the exact (float64) result: max abs "
                     "error modelalloy / mergekit; share of elements equal to the correctly "
                     "rounded bf16 value |")
            L.append("|---|---:|---:|---:|---:|---|")
            for method, c in r["compare"].items():
                if "error" in c:
                    L.append(f"| {method} | {c['error']} | | | | |")
                    continue
                refcol = "—"
                if "ours_max_err_vs_fp64" in c:
                    refcol = (f"{c['ours_max_err_vs_fp64']:.2e} / "
                              f"{c['mergekit_max_err_vs_fp64']:.2e}; "
                              f"{100 * c['ours_correctly_rounded']:.2f}% / "
                              f"{100 * c['mergekit_correctly_rounded']:.2f}%")
                where = f" ({c['worst_tensor']})" if c.get("worst_tensor") else ""
                L.append(f"| {method} | {c['max_abs_diff']:.3e}{where} | "
                         f"{c['max_abs_value']:.3g} | "
                         f"{100 * c['frac_differ']:.2f}% | {100 * c['frac_gt_1ulp']:.3f}% | "
                         f"{refcol} |")
            L.append("")
        spied = {k: v["py_spy"] for k, v in r["methods"].items()
                 if v.get("py_spy") and "samples" in v["py_spy"]}
        if spied:
            from profile_merge import STAGES

            used = [st for st in STAGES if any(v["samples"].get(st) for v in spied.values())]
            L.append(f"**Where modelalloy spends its time ({size}; py-spy, 100 samples/s, "
                     "all threads, idle threads left out; CPU-seconds per stage and share)**")
            L.append("")
            L.append("| method | " + " | ".join(used) + " |")
            L.append("|---|" + "---:|" * len(used))
            for method, v in spied.items():
                tot = v["total"] or 1
                L.append(f"| {method} | " + " | ".join(
                    f"{v['samples'].get(st, 0) / v['rate']:.1f} "
                    f"({100 * v['samples'].get(st, 0) / tot:.0f}%)" for st in used) + " |")
            L.append("")
        if r.get("profile"):
            p = r["profile"]
            s = p["seconds"]
            L.append(f"**What each stage costs at least ({size}; the stages run one after "
                     "another by a plain loop on the same files, "
                     f"{p['threads']} torch threads, one pass over base + 3 experts)**")
            L.append("")
            L.append("| stage | seconds |")
            L.append("|---|---:|")
            for k, label in (("read", "read every tensor (safetensors, warm cache)"),
                             ("cast_up", "bf16 → fp32 casts (4 models)"),
                             ("linear_math", "linear merge arithmetic in fp32"),
                             ("sort_trim", "TIES trim by full argsort, 3 experts (mergekit)"),
                             ("kthvalue_trim", "TIES trim by kthvalue, 3 experts"),
                             ("topk_trim", "TIES trim by topk(sorted=False), 3 experts"),
                             ("cast_down", "fp32 → bf16 cast of the result"),
                             ("write", "write the result (safetensors save_file)")):
                L.append(f"| {label} | {s[k]:.2f} |")
            L.append("")
    if findings is not None and findings.exists():
        L.append(findings.read_text().rstrip("\n"))
        L.append("")
    L.append("### Notes on the comparison")
    L.append("")
    L.extend(NOTES)
    L.append("")
    L.append("### How to reproduce")
    L.append("")
    L.extend(REPRODUCE)
    L.append("")
    return "\n".join(L)


NOTES = [
    "- Recipes (`benchmarks/merge_speed.py::recipe_yaml`): linear (weights 0.5/0.3/0.2, "
    "normalised, three experts, no base); task_arithmetic (weight 0.5 each); ties (weight 1, "
    "density 0.2, normalize); dare_ties (weight 0.5, density 0.2); breadcrumbs and "
    "breadcrumbs_ties (weight 0.5, density 0.2, gamma 0.01); slerp (base and expert 1, "
    "t = 0.5). `dtype: bfloat16` in all: "
    "for mergekit this is the compute dtype, for modelalloy the output dtype (it computes in "
    "float32).",
    "- Where the outputs differ by design: mergekit computes in bf16 (each product and sum is "
    "rounded to 8 bits of mantissa), modelalloy in float32 with one rounding at the end; "
    "mergekit's `ties` elects the sign from the *weighted* sum of trimmed deltas and trims "
    "with an exact-k argsort; its `dare_ties` and `breadcrumbs` rescale the kept deltas to "
    "the original L1 norm (`rescale: true` default) and its DARE masks come from the global "
    "torch RNG, while modelalloy seeds each tensor's generator from the recipe seed and the "
    "tensor name, so dare_ties outputs are not comparable element by element and are not "
    "compared; mergekit's SLERP runs in NumPy float32 on bf16 inputs. Differences of one bf16 "
    "ulp are rounding; larger ones on a small share of elements in TIES/breadcrumbs come "
    "from ties at the trim threshold and the sign election.",
    "- mergekit is run with its defaults (`mergekit-yaml RECIPE OUT --no-copy-tokenizer`: "
    "sequential executor, no async write, default threads; the synthetic models have no "
    "tokenizer to copy); modelalloy with its defaults (`modelalloy merge RECIPE OUT --force`: "
    "min(4, cores) worker threads, no budget, `--direct-io auto`: inputs above half the "
    "memory available, as at 3B, are read with O_DIRECT, docs/direct_io.md) plus the options "
    "given to the script (`--extra-args '--direct-io off'`: the page cache path). Outputs "
    "are deleted after each run, so neither tool's writes pile up in the page cache.",
]

REPRODUCE = [
    "```sh",
    "# mergekit in its own environment (never a modelalloy dependency)",
    "python3 -m venv ../venv-mergekit",
    "../venv-mergekit/bin/pip install torch==2.13.0   # the CPU wheel first",
    "../venv-mergekit/bin/pip install mergekit",
    "# then, from the repository root (the script finds ../venv-mergekit by itself;",
    "# otherwise pass --mergekit-bin PATH or set MERGEKIT_YAML):",
    "PYTHONPATH=src python benchmarks/merge_speed.py --sizes 100M --runs 3",
    "PYTHONPATH=src python benchmarks/merge_speed.py --sizes 1B --runs 3",
    "make bench-speed          # both sizes, defaults",
    "# larger than RAM: 24 GB of inputs, cold runs only, models deleted afterwards",
    "PYTHONPATH=src python benchmarks/merge_speed.py --sizes 3B --runs 1",
    "```",
    "",
    "Synthetic models are cached in `benchmarks/.cache/` (about 0.8 GB for 100M, 8 GB for 1B); "
    "results accumulate in `benchmarks/results/merge_speed.json` (one entry per size, replaced "
    "when that size is rerun) and this section is regenerated from it. `--methods`, "
    "`--budgets`, `--no-compare`, `--no-profile`, `--threads` and `--timeout` narrow or extend "
    "a run; `--help` lists them. `--sizes 3B` (or `--larger-than-ram` for any size) checks "
    "the free disk first and refuses with the space it needs (about 38 GB for 3B), runs "
    "linear, task_arithmetic, ties and dare_ties cold only (`--cold-methods` to change; "
    "`--cold-mergekit-methods` for those mergekit also runs), "
    "and deletes the generated models after the run unless `--keep-models`.",
]


def write_doc(out: Path, section: str) -> None:
    """Replace the section of ``out`` headed by the section's first line (or append it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else "# Performance\n\n"
    lines = text.splitlines()
    heading = section.splitlines()[0].strip()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
                   len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines()
                        + ([""] + lines[end:] if end < len(lines) else [])) + "\n"
    out.write_text(new if new.endswith("\n") else new + "\n")


# --------------------------------------------------------------------------------------------
# Cold page cache: the inputs read from disk, as with models larger than RAM
# --------------------------------------------------------------------------------------------

def io_floor(inputs: list[Path], write_bytes: int, work: Path, readers: int,
             durable: bool) -> float:
    """Seconds the machine takes to do a merge's I/O and nothing else: ``readers`` threads
    read the inputs cold (dropped from the page cache first) while one thread writes
    ``write_bytes`` in 1 MiB calls, fsynced at the end when ``durable`` (as modelalloy's
    output is; mergekit's is not). Reads and writes share the disk, so this is measured
    rather than added up from separate bandwidths."""
    import threading

    _drop_cache(inputs)
    target = work / "floor.tmp"
    chunk = os.urandom(1 << 20)

    def read(files: list[Path]) -> None:
        _read_files(files, bytearray(1 << 20))

    def write() -> None:
        with open(target, "wb", buffering=0) as f:
            for start in range(0, write_bytes, len(chunk)):
                f.write(chunk[: min(len(chunk), write_bytes - start)])
            if durable:
                os.fsync(f.fileno())

    threads = [threading.Thread(target=read, args=(inputs[i::readers],))
               for i in range(readers)] + [threading.Thread(target=write)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    target.unlink()
    return seconds


RUN_ID = _dt.datetime.now(_dt.timezone.utc).isoformat()  # this invocation of the script


def measured_now(load_before: str, runs: int) -> dict:
    """When and at which commit a method's rows were measured (rows outlive their run)."""
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "load_before": load_before, "runs": runs, "run": RUN_ID}


def carry_over(prev: dict | None, rec: dict, methods: list[str],
               budget_methods: list[str]) -> None:
    """Keep the rows of ``prev`` (the size's earlier record) that this run does not redo:
    other methods with their output comparison, other methods' budget runs, the cold rows
    and the stage profile. Each carried method keeps when it was measured."""
    if not prev:
        return
    for name, m in prev.get("methods", {}).items():
        if name in methods:
            continue
        m.setdefault("measured", {k: prev["env"].get(k) for k in (
            "date", "commit", "runs", "load_before", "run")})
        rec["methods"][name] = m
        if name in prev.get("compare", {}):
            rec["compare"][name] = prev["compare"][name]
    rec["budgets"] = [b for b in prev.get("budgets", []) if b["method"] not in budget_methods]
    for key in ("cold", "profile"):
        if key in prev:
            rec[key] = prev[key]


def cold_runs(methods: list[str], models: dict[str, Path], rdir: Path, work: Path,
              tools: dict[str, tuple[Callable[[str, str], list[str]], dict[str, str]]],
              runs: int,
              write_Bps: float, timeout: float,
              mergekit_methods: set[str] | None = None) -> dict:
    """Each tool on each recipe with the recipe's input shards dropped from the page cache
    before every run (``posix_fadvise(DONTNEED)``), so every byte comes from the disk: the
    case of 7B–70B merges, whose inputs do not fit in RAM. The bound reads at the best cold
    bandwidth of 1, 2 or 4 concurrent readers and writes at the buffered write bandwidth.
    ``mergekit_methods`` (None: all) are the methods mergekit also runs: a larger-than-RAM
    mergekit run of the sparsifying methods takes many minutes."""
    streams = {str(n): measure_cold_read(models, n, work) for n in (1, 2, 4)}
    best = max(streams.values())
    print("[cold] read " + ", ".join(f"{n} reader(s) {b / 1e9:.2f} GB/s"
                                     for n, b in streams.items()))
    out: dict = {"read_cold_Bps_by_readers": streams, "methods": {},
                 "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "load_before": _load_avg(), "commit": _commit(), "runs": runs,
                 "write_buffered_Bps": write_Bps}
    floors: dict[tuple, float] = {}  # recipes with the same inputs and output share them
    for method in methods:
        recipe = rdir / f"{method}.yml"
        recipe.write_text(recipe_yaml(method, models))
        inputs = [f for p in recipe_inputs(method, models) for f in model_files(p)]
        read_bytes = sum(f.stat().st_size for f in inputs)
        here = {name: t for name, t in tools.items() if name != "mergekit"
                or mergekit_methods is None or method in mergekit_methods}
        m: dict = {name: [] for name in here} | {"read_bytes": read_bytes}
        for run in range(runs):
            for name, (cmd, env) in here.items():
                o = work / f"{method}-{name}-cold"
                shutil.rmtree(o, ignore_errors=True)
                _drop_cache(inputs)
                r = run_measured(cmd(str(recipe), str(o)), env,
                                 work / f"{method}-{name}-cold-{run}.log", timeout)
                if r["rc"] == 0 and "write_bytes" not in m:
                    m["write_bytes"] = sum(f.stat().st_size for f in model_files(o))
                shutil.rmtree(o, ignore_errors=True)
                m[name].append(r)
                print(f"[cold {method}] {name} run {run + 1}: {r['wall_s']:.2f}s"
                      + (f" FAILED rc={r['rc']}: {r['log_tail'][-300:]}" if r["rc"] else ""))
        m["io_bound_s"] = read_bytes / best + m.get("write_bytes", 0) / write_Bps
        readers = int(max(streams, key=streams.get))
        for key, durable in (("floor_durable_s", True), ("floor_buffered_s", False)):
            same = (tuple(inputs), m.get("write_bytes", 0), durable)
            if same not in floors:
                floors[same] = min(io_floor(inputs, m.get("write_bytes", 0), work, readers,
                                            durable) for _ in range(2))
            m[key] = floors[same]
        print(f"[cold {method}] I/O floor {m['floor_durable_s']:.2f}s with fsync, "
              f"{m['floor_buffered_s']:.2f}s without")
        out["methods"][method] = m
    out["load_after"] = _load_avg()
    return out


BASELINE_CODE = "import torch, modelalloy.cli, modelalloy.engine.run, os; os._exit(0)"
OLD_BASELINE_CODE = "import torch, modelalloy.cli, modelalloy.engine.run"  # before 2026-11-24


def _bounds(m: dict, wall: float | None = None) -> str:
    """"buffered / durable" I/O bounds of a row in seconds, or ``wall`` as multiples of them
    (rows measured before the durable bound existed show only the buffered one)."""
    bounds = [m["io_bound_s"]] + ([m["io_bound_durable_s"]] if "io_bound_durable_s" in m
                                  else [])
    if wall is None:
        return " / ".join(f"{b:.3g}" for b in bounds)
    return " / ".join(f"{wall / b:.1f}×" for b in bounds) if wall else "—"


def render_larger_than_ram(r: dict) -> list[str]:
    """A size whose inputs do not fit in the page cache: its cold rows only."""
    total = 4 * r["model_bytes"]
    L = [f"- The four models are {_gb(total)} on disk against {_mem_gib():.0f} GiB of RAM: "
         "no run can find them in the page cache, so only cold runs are measured. Targets "
         "(issue 21): peak RSS under 2 GB, at least 3× mergekit, within 1.3× of the measured "
         "I/O floor with fsync.", ""]
    if r.get("cold"):
        L.extend(render_cold(r["cold"]))
    for why in r.get("skip_reasons", []):
        L.append(f"- Skipped: {why}")
    if r.get("skip_reasons"):
        L.append("")
    return L


def cold_write_Bps(c: dict) -> float | None:
    """The buffered write bandwidth the cold rows ``c`` were bounded with: that of their own
    run, never the size's latest (cold rows outlive the warm rows they were measured with).
    Rows recorded before it was stored get it back from their bound, which is read bytes ÷
    the best cold read bandwidth + written bytes ÷ it."""
    if c.get("write_buffered_Bps"):
        return c["write_buffered_Bps"]
    best = max(c["read_cold_Bps_by_readers"].values())
    for m in c["methods"].values():
        write_s = m["io_bound_s"] - m["read_bytes"] / best
        if m.get("write_bytes") and write_s > 0:
            return m["write_bytes"] / write_s
    return None


def render_cold(c: dict) -> list[str]:
    by = c["read_cold_Bps_by_readers"]
    write_Bps = cold_write_Bps(c)
    L = [f"**Cold page cache** (measured {c['date']}, commit {c['commit']}, {c['runs']} "
         f"run{'s' if c['runs'] != 1 else ''} per tool; load {c['load_before']} / "
         f"{c['load_after']}). Before every run the recipe's input shards are dropped from the "
         "page cache (`posix_fadvise(DONTNEED)`), so each byte is read from the disk, as when "
         "the models are larger than RAM. The bound reads at the best cold bandwidth of 1, 2 "
         "or 4 concurrent readers (" + ", ".join(f"{n}: {b / 1e9:.2f} GB/s"
                                                 for n, b in by.items())
         + f") and writes at {_fmt(write_Bps and write_Bps / 1e9, '.2f', '?')} GB/s "
         "buffered. The I/O floors are "
         "measured instead: the inputs read cold by the best number of readers while one "
         "thread writes the output's bytes, with fsync at the end (durable, as modelalloy "
         "writes) and without (as mergekit writes); best of two. Reads and writes share the "
         "disk, which the added-up bound ignores. CPU-s is user + system time of the command "
         "(`wait4`); read from disk is the process's `read_bytes` in `/proc/PID/io` at its "
         "exit (page-cache misses, page faults on mapped shards and readahead included).", "",
         "| method | modelalloy median s | mergekit median s | speed-up (median of per-run "
         "ratios) | per-run ratios | I/O bound s | I/O floor s, with / without fsync | "
         "modelalloy ÷ floor with fsync | mergekit ÷ floor without | peak RSS modelalloy | "
         "peak RSS mergekit | CPU-s (user + system) modelalloy / mergekit | read from disk "
         "GB modelalloy / mergekit (inputs GB) |",
         "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, m in c["methods"].items():
        ours = [x["wall_s"] for x in m.get("modelalloy", []) if x["rc"] == 0]
        theirs = [x["wall_s"] for x in m.get("mergekit", []) if x["rc"] == 0]
        ratios = [b["wall_s"] / a["wall_s"] for a, b in
                  zip(m.get("modelalloy", []), m.get("mergekit", []), strict=False)
                  if a["rc"] == 0 and b["rc"] == 0]
        mo, mt = _med(ours), _med(theirs)
        fd, fb = m.get("floor_durable_s"), m.get("floor_buffered_s")

        def per(x: float | None, floor: float | None) -> str:
            return f"{x / floor:.2f}×" if x and floor else "—"

        def rss(tool: str, m: dict = m) -> str:
            ok = [x for x in m.get(tool, []) if x["rc"] == 0 and "peak_rss_mb" in x]
            if not ok:
                return "—"
            return (f"{max(x['peak_rss_mb'] for x in ok):.0f} MB "
                    f"({max(x['peak_anon_mb'] for x in ok):.0f} anon)")

        def med_of(tool: str, f: Callable[[dict], float | None], fmt: str,
                   m: dict = m) -> str:
            vals = [v for x in m.get(tool, []) if x["rc"] == 0 and (v := f(x)) is not None]
            return _fmt(_med(vals), fmt) if vals else "—"

        def cpu(x: dict) -> float:
            return x["user_s"] + x["sys_s"]

        def read_gb(x: dict) -> float | None:  # /proc/PID/io read_bytes (runs since 2026-12-07)
            return x["disk_read_bytes"] / 1e9 if x.get("disk_read_bytes") is not None else None

        mt_s, speed = _fmt(mt, '.2f'), f"{_fmt(_med(ratios), '.2f')}{'×' if ratios else ''}"
        stopped = [x for x in m.get("mergekit", []) if x.get("timed_out")]
        if not theirs and stopped and mo:  # killed at --timeout: a lower bound
            least = min(x["wall_s"] for x in stopped)
            mt_s = f"> {least:.0f} (stopped at the timeout)"
            speed = f"> {least / mo:.1f}×"
        L.append(f"| {method} | {_fmt(mo, '.2f')} | {mt_s} | {speed} | "
                 f"{', '.join(f'{x:.2f}' for x in ratios) or '—'} | {m['io_bound_s']:.3g} | "
                 f"{_fmt(fd, '.3g')} / {_fmt(fb, '.3g')} | {per(mo, fd)} | {per(mt, fb)} | "
                 f"{rss('modelalloy')} | {rss('mergekit')} | "
                 f"{med_of('modelalloy', cpu, '.1f')} / {med_of('mergekit', cpu, '.1f')} | "
                 f"{med_of('modelalloy', read_gb, '.2f')} / {med_of('mergekit', read_gb, '.2f')}"
                 f" ({m['read_bytes'] / 1e9:.2f}) |")
    L.append("")
    return L


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_bytes(s: str) -> int:
    """As the CLI reads sizes: KB/MB/GB decimal, KiB/MiB/GiB binary."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", s, re.I)
    if not m:
        raise SystemExit(f"cannot read a size from {s!r} (use e.g. 512MB, 2GB)")
    unit = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * unit**power)


DEFAULT_BUDGETS = {"2M": ["64MB"], "100M": ["256MB", "1GB"], "1B": ["1GB", "4GB"]}


def _load_avg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                       text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100M,1B",
                    help=f"comma list of {', '.join(SIZES)} (default 100M,1B)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and method (default 3)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--results", type=Path, default=None,
                    help="JSON file the measurements accumulate in (default "
                         "benchmarks/results/merge_speed.json, or next to --out when --out "
                         "is outside the repository)")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where outputs and logs go (default: a temporary folder)")
    ap.add_argument("--mergekit-bin", default=None,
                    help="mergekit-yaml executable (default: $MERGEKIT_YAML, PATH, "
                         "../venv-mergekit/bin)")
    ap.add_argument("--no-mergekit", action="store_true", help="time modelalloy only")
    ap.add_argument("--python", default=sys.executable, help="python that runs modelalloy")
    ap.add_argument("--modelalloy-cmd", default=None,
                    help="command that stands for `modelalloy merge` (default: PYTHON -m "
                         "modelalloy merge, with PYTHONPATH=src)")
    ap.add_argument("--threads", type=int, default=None, help="modelalloy --threads")
    ap.add_argument("--extra-args", default="", help="more modelalloy merge options")
    ap.add_argument("--budgets", default=None,
                    help="memory budgets for the --memory-budget runs, e.g. 256MB,1GB; "
                         "'none' to skip (default per size)")
    ap.add_argument("--budget-methods", default="linear,ties")
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--py-spy", default=None,
                    help="py-spy executable for the per-stage profile of modelalloy (default: "
                         "$PY_SPY, PATH, ../venv-tools/bin/py-spy); skipped when absent")
    ap.add_argument("--profile-sizes", default="2M,100M",
                    help="sizes that get the component profile (the full-sort row takes "
                         "minutes at 1B; default 2M,100M)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--cold-methods", default=None,
                    help="methods also run with the inputs dropped from the page cache before "
                         "every run ('none' to skip; default linear,task_arithmetic; for a "
                         "size larger than RAM, the methods it runs: default "
                         + ",".join(LARGE_METHODS) + ")")
    ap.add_argument("--cold-mergekit-methods", default=None,
                    help="of the cold methods, those mergekit also runs (default: all)")
    ap.add_argument("--larger-than-ram", action="store_true",
                    help="treat every size as one whose models do not fit in RAM (as 3B "
                         "always is): cold runs only, models deleted after the run")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep the generated models of a size larger than RAM after the run "
                         "(they are deleted by default: 24 GB for 3B)")
    ap.add_argument("--cold-runs", type=int, default=None,
                    help="runs per tool for the cold-cache rows (default: --runs)")
    ap.add_argument("--budgets-only", action="store_true",
                    help="run only the --memory-budget rows of --budget-methods (inputs warm) "
                         "and put them in the size's existing results in place of that "
                         "method's earlier budget rows")
    ap.add_argument("--cold-only", action="store_true",
                    help="run only the cold-cache rows and add them to the size's existing "
                         "results (the warm rows stay as measured)")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="skip the untimed merge per method that fills numba's kernel cache")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the section of --out from the results file; run nothing")
    args = ap.parse_args(argv)

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in KNOWN_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(KNOWN_METHODS)}")
    out = args.out.resolve()
    results_path = args.results
    if results_path is None:
        in_repo = REPO in out.parents
        results_path = (REPO / "benchmarks" / "results" / "merge_speed.json" if in_repo
                        else out.with_suffix(".json"))
    if args.render_only:
        results = json.loads(results_path.read_text())
        write_doc(out, render_section(results, FINDINGS if REPO in out.parents else None))
        print(f"[doc] wrote {out} from {results_path}")
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="merge-speed-"))
    work.mkdir(parents=True, exist_ok=True)

    ma_cmd = (args.modelalloy_cmd.split() if args.modelalloy_cmd
              else [args.python, "-m", "modelalloy", "merge"])
    ok, why = modelalloy_available(ma_cmd)
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.no_mergekit:
        mk, mk_why = None, "mergekit disabled with --no-mergekit"
    else:
        mk, mk_why = find_mergekit(args.mergekit_bin)
    if mk is None:
        print(f"[mergekit] skipping the mergekit rows: {mk_why}")
    else:
        print(f"[mergekit] {mk} ({mk_why})")
    mk_desc = mergekit_version(mk) if mk else f"not run ({mk_why})"

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from profile_merge import find_py_spy

    spy = None if args.no_profile else find_py_spy(args.py_spy)
    if spy is None and not args.no_profile:
        print("[py-spy] not found: the per-stage profile of modelalloy is skipped "
              "(pip install py-spy into any venv and pass --py-spy)")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("sizes", {})
    extra = args.extra_args.split()
    if args.threads:
        extra += ["--threads", str(args.threads)]
    env_ma = modelalloy_env()

    env_mk = dict(os.environ)
    env_mk.pop("PYTHONPATH", None)
    # import baseline: what the interpreter + torch + our CLI module cost before any merge,
    # ended as the command ends (os._exit: no interpreter teardown)
    base_run = run_measured([args.python, "-c", BASELINE_CODE], env_ma,
                            work / "baseline.log", 300)
    mk_base = None
    if mk and (Path(mk).parent / "python").exists():
        mk_base = run_measured([str(Path(mk).parent / "python"), "-c",
                                "import mergekit.scripts.run_yaml, mergekit.merge"], env_mk,
                               work / "baseline-mergekit.log", 300)

    given_cold = args.cold_methods
    cold_methods = [] if given_cold == "none" else [
        x.strip() for x in (given_cold or "linear,task_arithmetic").split(",") if x.strip()]
    large_methods = cold_methods if given_cold else LARGE_METHODS
    for x in cold_methods:
        if x not in KNOWN_METHODS:
            raise SystemExit(f"unknown method {x!r} in --cold-methods")
    mergekit_methods = (None if args.cold_mergekit_methods is None else
                        {x.strip() for x in args.cold_mergekit_methods.split(",") if x.strip()})
    tools = {"modelalloy": (lambda r, o: ma_cmd + [r, o] + extra, env_ma)}
    if mk:
        tools["mergekit"] = (lambda r, o: [mk, r, o, "--no-copy-tokenizer"], env_mk)

    def cold(size: str, rec: dict, models: dict[str, Path], which: list[str]) -> None:
        cdir = work / size / "cold"
        cdir.mkdir(parents=True, exist_ok=True)
        rec["cold"] = cold_runs(which, models, cdir, cdir, tools,
                                args.cold_runs or args.runs,
                                (rec.get("bandwidth") or rec["write"])["write_buffered_Bps"],
                                args.timeout, mergekit_methods)

    def environment(load_before: str) -> dict:
        return {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} cores, {_mem_gib():.0f} GiB RAM, "
                       f"{platform.machine()} Linux", "cpu": cpu_model(),
            "load_before": load_before, "load_after": _load_avg(),
            "runs": args.cold_runs or args.runs, "commit": _commit(), "mergekit": mk_desc,
            "run": RUN_ID,
            "modelalloy_cmd": " ".join(["modelalloy merge RECIPE OUT --force"] + extra)}

    def larger_than_ram(size: str) -> None:
        """Cold runs only; the models are generated for the run and deleted after it."""
        root = models_root(size, args.cache_dir.resolve())
        load_before = _load_avg()
        models = generate_models(size, args.cache_dir.resolve())
        try:
            nbytes = folder_bytes(models["base"])
            rec = {"params": SIZES[size].params, "model_bytes": nbytes, "larger_than_ram": True,
                   "write": measure_write(min(nbytes, 1 << 30), work),
                   "skip_reasons": [] if mk else [f"mergekit: {mk_why}"]}
            cold(size, rec, models, large_methods)
            rec["env"] = environment(load_before) | {"runs": args.cold_runs or args.runs}
            results["sizes"][size] = rec
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            write_doc(out, render_section(results, FINDINGS if REPO in out.parents else None))
            print(f"[doc] wrote {out} (results in {results_path})")
        finally:
            if args.keep_models:
                print(f"[gen] kept {root} (--keep-models)")
            else:
                shutil.rmtree(root, ignore_errors=True)
                print(f"[gen] deleted {root} (--keep-models keeps it)")

    def budget_runs(size: str, rec: dict, rdir: Path, which: list[str]) -> None:
        """modelalloy under each ``--budgets`` memory budget (default per size), on warm
        inputs; the runs are added to ``rec["budgets"]``."""
        budgets = (args.budgets if args.budgets is not None
                   else ",".join(DEFAULT_BUDGETS.get(size, [])))
        if not budgets or budgets == "none":
            return
        for method in which:
            for b in budgets.split(","):
                o = work / size / f"{method}-budget"
                shutil.rmtree(o, ignore_errors=True)
                r = run_measured(ma_cmd + [str(rdir / f"{method}.yml"), str(o), "--force",
                                           "--memory-budget", b] + extra, env_ma,
                                 work / size / f"{method}-budget-{b}.log", args.timeout)
                shutil.rmtree(o, ignore_errors=True)
                rec["budgets"].append({"method": method, "budget": b, "budget_bytes":
                                       parse_bytes(b), "run": r,
                                       "measured": measured_now(_load_avg(), 1)})
                print(f"[{size} {method}] --memory-budget {b}: {r['wall_s']:.2f}s rss "
                      f"{r['peak_rss_mb']:.0f}MB anon {r['peak_anon_mb']:.0f}MB"
                      + (f" FAILED rc={r['rc']}" if r["rc"] else ""))

    # numba compiles the fused kernels on first use and caches them on disk (any second merge
    # finds them): one untimed merge per method on the 2M models, so no timed run compiles
    small = None if args.no_warm_up else generate_models("2M", args.cache_dir.resolve())
    large = [s for s in sizes if s in LARGER_THAN_RAM or args.larger_than_ram]
    for s in sizes:  # before generating anything
        check_disk(s, args.cache_dir.resolve(), work)
    warm_up = (cold_methods if args.cold_only else
               [x for x in args.budget_methods.split(",") if x.strip()] if args.budgets_only
               else methods)
    warm_up = warm_up + [x for x in (large_methods if large else []) if x not in warm_up]
    for method in warm_up if small else ():
        recipe = work / "warm-up" / f"{method}.yml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_yaml(method, small))
        r = run_measured(ma_cmd + [str(recipe), str(work / "warm-up" / "out"), "--force"]
                         + extra, env_ma, work / "warm-up" / f"{method}.log", args.timeout)
        print(f"[warm-up] {method}: {r['wall_s']:.1f}s" + (f" rc={r['rc']}" if r["rc"] else ""))
    shutil.rmtree(work / "warm-up", ignore_errors=True)

    for size in sizes:
        print(f"=== {size} ===")
        if size in large:
            larger_than_ram(size)
            continue
        models = generate_models(size, args.cache_dir.resolve())
        if args.budgets_only:
            if size not in results["sizes"]:
                raise SystemExit(f"--budgets-only: no results for {size} in {results_path} "
                                 "yet; run without --budgets-only first")
            prev = results["sizes"][size]
            which = [x for x in args.budget_methods.split(",") if x.strip()]
            prev["budgets"] = [b for b in prev.get("budgets", []) if b["method"] not in which]
            rdir = work / size / "recipes"
            rdir.mkdir(parents=True, exist_ok=True)
            for method in which:
                (rdir / f"{method}.yml").write_text(recipe_yaml(method, models))
            warm_inputs(models)
            budget_runs(size, prev, rdir, which)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            write_doc(out, render_section(results, FINDINGS if REPO in out.parents else None))
            print(f"[doc] wrote {out} (results in {results_path})")
            continue
        if args.cold_only:
            if size not in results["sizes"]:
                raise SystemExit(f"--cold-only: no results for {size} in {results_path} yet; "
                                 "run without --cold-only first")
            cold(size, results["sizes"][size], models, cold_methods)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            write_doc(out, render_section(results, FINDINGS if REPO in out.parents else None))
            print(f"[doc] wrote {out} (results in {results_path})")
            continue
        load_before = _load_avg()
        bw = measure_bandwidth(models, work)
        print(f"[io] read warm {bw['read_warm_Bps'] / 1e9:.2f} GB/s, cold "
              f"{bw['read_cold_Bps'] / 1e9:.2f} GB/s; write {bw['write_buffered_Bps'] / 1e9:.2f}"
              f" GB/s buffered, {bw['write_fsync_Bps'] / 1e9:.2f} GB/s with fsync")
        warm_inputs(models)
        rec = {"params": SIZES[size].params, "model_bytes": folder_bytes(models["base"]),
               "bandwidth": bw, "methods": {}, "compare": {}, "budgets": [],
               "skip_reasons": [] if mk else [f"mergekit: {mk_why}"],
               "baseline_rss_mb": base_run["peak_rss_mb"],
               "baseline_wall_s": base_run["wall_s"],
               "baseline_code": BASELINE_CODE,
               "mergekit_baseline_wall_s": mk_base["wall_s"] if mk_base else None,
               "baseline_anon_mb": base_run["peak_anon_mb"]}
        carry_over(results["sizes"].get(size), rec, methods,
                   [x for x in args.budget_methods.split(",") if x in methods])

        def save(rec: dict = rec, size: str = size, load_before: str = load_before) -> None:
            rec["env"] = environment(load_before) | {"runs": args.runs}
            results["sizes"][size] = rec
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            write_doc(out, render_section(results, FINDINGS if REPO in out.parents else None))

        rdir = work / size / "recipes"
        rdir.mkdir(parents=True, exist_ok=True)
        for method in methods:
            recipe = rdir / f"{method}.yml"
            recipe.write_text(recipe_yaml(method, models))
            read_bytes = sum(sum(f.stat().st_size for f in model_files(p))
                             for p in recipe_inputs(method, models))
            m = {"modelalloy": [], "mergekit": [], "mergekit_skipped": mk is None,
                 "read_bytes": read_bytes, "measured": measured_now(load_before, args.runs)}
            keep = {}
            for run in range(args.runs):
                last = run == args.runs - 1
                o_ma = work / size / f"{method}-modelalloy"
                shutil.rmtree(o_ma, ignore_errors=True)
                r = run_measured(ma_cmd + [str(recipe), str(o_ma), "--force"] + extra, env_ma,
                                 work / size / f"{method}-modelalloy-{run}.log", args.timeout)
                m["modelalloy"].append(r)
                print(f"[{size} {method}] modelalloy run {run + 1}: {r['wall_s']:.2f}s "
                      f"rss {r['peak_rss_mb']:.0f}MB anon {r['peak_anon_mb']:.0f}MB"
                      + (f" FAILED rc={r['rc']}: {r['log_tail'][-300:]}" if r["rc"] else ""))
                if r["rc"] == 0:
                    m["write_bytes"] = sum(f.stat().st_size for f in model_files(o_ma))
                if last and r["rc"] == 0:
                    keep["modelalloy"] = o_ma
                else:
                    shutil.rmtree(o_ma, ignore_errors=True)
                if mk:
                    o_mk = work / size / f"{method}-mergekit"
                    shutil.rmtree(o_mk, ignore_errors=True)
                    cmd = [mk, str(recipe), str(o_mk), "--no-copy-tokenizer"]
                    r = run_measured(cmd, env_mk, work / size / f"{method}-mergekit-{run}.log",
                                     args.timeout)
                    m["mergekit"].append(r)
                    print(f"[{size} {method}] mergekit   run {run + 1}: {r['wall_s']:.2f}s "
                          f"rss {r['peak_rss_mb']:.0f}MB anon {r['peak_anon_mb']:.0f}MB"
                          + (f" FAILED rc={r['rc']}: {r['log_tail'][-300:]}"
                             if r["rc"] else ""))
                    if last and r["rc"] == 0:
                        keep["mergekit"] = o_mk
                    else:
                        shutil.rmtree(o_mk, ignore_errors=True)
            if spy and size in args.profile_sizes.split(",") and not args.no_profile:
                from profile_merge import profile as spy_profile

                o = work / size / f"{method}-pyspy"
                m["py_spy"] = spy_profile(ma_cmd + [str(recipe), str(o), "--force"] + extra,
                                          env_ma, spy, 100, work / size, [REPO / "src"],
                                          tag=method)
                shutil.rmtree(o, ignore_errors=True)
                print(f"[{size} {method}] py-spy: " + ", ".join(
                    f"{k} {v / 100:.1f}s" for k, v in m["py_spy"].get("samples", {}).items()))
            wb = m.get("write_bytes", SIZES[size].params * 2)
            m["io_bound_s"] = (read_bytes / bw["read_warm_Bps"]
                               + wb / bw["write_buffered_Bps"])
            # the same with the write bandwidth including fsync: the floor of a merge whose
            # output is on the disk when it returns (modelalloy's), not only in the page cache
            m["io_bound_durable_s"] = (read_bytes / bw["read_warm_Bps"]
                                       + wb / bw["write_fsync_Bps"])
            rec["methods"][method] = m
            if (not args.no_compare and method in DETERMINISTIC and "modelalloy" in keep
                    and "mergekit" in keep):
                try:
                    rec["compare"][method] = compare_outputs(keep["modelalloy"],
                                                             keep["mergekit"], method, models)
                    c = rec["compare"][method]
                    print(f"[{size} {method}] max abs diff {c['max_abs_diff']:.3e}, "
                          f">1ulp {100 * c['frac_gt_1ulp']:.3f}%")
                except Exception as exc:  # report, never lose the timings over it
                    rec["compare"][method] = {"error": f"comparison failed: {exc}"}
            for p in keep.values():
                shutil.rmtree(p, ignore_errors=True)
            save()  # after every method, so an interrupted run keeps what it measured
        budget_runs(size, rec, rdir, [x for x in args.budget_methods.split(",")
                                      if x in methods])
        if [x for x in cold_methods if x in methods]:  # those of this run's --methods
            cold(size, rec, models, [x for x in cold_methods if x in methods])
        if not args.no_profile and size in args.profile_sizes.split(","):
            rec["profile"] = profile_components(models, work)
            print("[profile] " + ", ".join(f"{k} {v:.2f}s"
                                           for k, v in rec["profile"]["seconds"].items()))
        save()
        print(f"[doc] wrote {out} (results in {results_path})")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def cpu_model() -> str:
    """The CPU's model name and its vector extensions (AVX2, AVX-512 subsets, AMX) from
    /proc/cpuinfo, recorded with every figure: kernels compiled for the host run other code
    on other CPUs."""
    name, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    vector = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni")]
    return f"{name}, {os.cpu_count()} cores; {' '.join(vector) or 'no AVX2/AVX-512'}"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())

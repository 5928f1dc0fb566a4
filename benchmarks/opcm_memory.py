"""Peak memory of a recipe OPCM merge from disk: base + 3 experts of ``--mb`` MB each.

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=src python benchmarks/opcm_memory.py

Prints the peak RSS above the process's RSS just before the merge (VmHWM reset through
/proc/self/clear_refs, Linux; a warm-up merge first, so library and thread-pool memory is not
counted) and a hash of the output, to compare two versions of the code. The malloc setting
returns freed tensors to the system at once, so the peak follows the live tensors.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import modelalloy


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _write_models(root: Path, mb: float) -> None:
    g = torch.Generator().manual_seed(0)
    rows = max(1, int(mb * 2**20 / 4 / 512 / 8))
    base = {f"model.layers.{i}.mlp.weight": torch.randn(rows, 512, generator=g)
            for i in range(8)}
    models = {"base": base}
    for t in range(3):
        models[f"e{t}"] = {n: v + 0.05 * torch.randn(v.shape, generator=g)
                           for n, v in base.items()}
    for ref, sd in models.items():
        (root / ref).mkdir()
        save_file(sd, str(root / ref / "model.safetensors"))
        (root / ref / "config.json").write_text(json.dumps({"architectures": ["X"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="size of each model in MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_models(root, args.mb)
        recipe = {"merge_method": "opcm", "base_model": str(root / "base"),
                  "models": [{"model": str(root / f"e{t}")} for t in range(3)]}
        modelalloy.merge(recipe, root / "warm", threads=1)
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM)
        before = _status_kb("VmRSS")
        modelalloy.merge(recipe, root / "out", threads=1)
        peak = _status_kb("VmHWM") - before
        out = load_file(str(root / "out" / "model.safetensors"))
        digest = hashlib.sha256(b"".join(out[k].numpy().tobytes() for k in sorted(out)))
        print(f"model {args.mb} MB x 4: peak RSS above start {peak / 1024:.1f} MB; "
              f"output sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()

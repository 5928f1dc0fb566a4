"""tiny-vision: a small convolutional classifier on scikit-learn's digits, with task experts.

The CLIP-benchmark protocol (Ilharco et al., Task Arithmetic; FusionBench's 8 CLIP tasks) at a
size that trains on two CPU cores:

- the *base* body is pre-trained on clean digits (8x8, 10 classes);
- each *task* is the digits seen through a fixed input transformation (inversion, a rotation,
  a flip, a shift, blur, noise, low contrast, occlusion, ...);
- each task gets a *head* fixed before fine-tuning: a few-shot linear probe on the base's
  features (the analogue of CLIP's zero-shot text head: cheap, fixed, mediocre);
- each *expert* is the base body fully fine-tuned on its task with its head frozen (Adam), so
  the experts differ from the base and from each other only in the body;
- merging merges the bodies; every task is then evaluated with its own head.

The body is a stack of numbered blocks (``blocks.0`` ... ``blocks.N-1``: convolutions stored as
matrices, then the Linear projection), so layer-wise methods (LiNeS, DOGE) find each tensor's
depth from its name, as they do on a ViT's ``encoder.layers.<i>``.

Some tasks are held out: their heads exist (to measure generalisation) but no expert of theirs is
merged. See docs/benchmarks.md for what was tried to make this suite tell methods apart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from modelalloy.bench import common
from modelalloy.bench.common import (
    SuiteError,
    SuiteInfo,
    TaskInfo,
    load_split,
    load_state_dict,
    save_model_folder,
    save_split,
)
from modelalloy.io.checkpoint import read_state_dict

MODEL_TYPE = "modelalloy-tiny-vision"
# Bump whenever a change alters what a build produces: it is part of the cache key.
BUILD_VERSION = 2  # 2: numbered block stack (blocks.<i>), noise sigma 0.3 -> 0.25


class ConvBlock(nn.Module):
    """A 3x3 convolution (+ ReLU, optionally a 2x2 max-pool) whose kernel is stored as a matrix.

    ``weight`` is ``(out, in * 9)``: the convolution as a linear map on 3x3 patches (im2col),
    the way a ViT's patch embedding is a matrix on patches. Every weight of the body is then a
    2-D matrix inside the block stack, as in the CLIP ViTs the papers merge, so the methods that
    work on matrices (SVD, DOGE's projections) see all of it.
    """

    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)  # PyTorch's own initialisation
        self.c_in, self.c_out, self.pool = c_in, c_out, pool
        self.weight = nn.Parameter(conv.weight.detach().reshape(c_out, c_in * 9).clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.weight.view(self.c_out, self.c_in, 3, 3), self.bias,
                            padding=1))
        return F.max_pool2d(x, 2) if self.pool else x


class TinyConvNet(nn.Module):
    """A stack of numbered blocks, ``blocks.0`` ... ``blocks.{depth}``: features.

    ``blocks.0``: conv 1->w; ``blocks.1``: conv w->2w + max-pool; ``depth - 2`` more convs
    2w->2w; the last block is the Linear(2w * (s/2)^2 -> feat) projection. Tensor names
    (``blocks.<i>.weight``) carry the layer index that layer-wise methods (LiNeS, DOGE) read
    through plan/layers.py.
    """

    def __init__(self, width: int = 16, feat_dim: int = 64, image_size: int = 8,
                 linear_features: bool = False, depth: int = 3) -> None:
        super().__init__()
        if depth < 2:
            raise SuiteError("tiny-vision: depth (convolutions) must be at least 2")
        self.linear_features = linear_features
        self.width, self.feat_dim, self.image_size = width, feat_dim, image_size
        self.depth = depth
        convs = [ConvBlock(1, width), ConvBlock(width, 2 * width, pool=True)]
        convs += [ConvBlock(2 * width, 2 * width) for _ in range(depth - 2)]
        self.blocks = nn.ModuleList([*convs,
                                     nn.Linear(2 * width * (image_size // 2) ** 2, feat_dim)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.unsqueeze(1)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x.flatten(1))
        return x if self.linear_features else F.relu(x)

    def hf_config(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "architectures": ["TinyConvNet"],
                "width": self.width, "feat_dim": self.feat_dim, "image_size": self.image_size,
                "linear_features": self.linear_features, "depth": self.depth,
                "num_blocks": len(self.blocks), "torch_dtype": "float32"}


def _new_body(cfg: dict[str, Any]) -> TinyConvNet:
    return TinyConvNet(cfg["width"], cfg["feat_dim"], cfg.get("canvas", 8),
                       cfg.get("linear_features", False), cfg.get("depth", 3))


# ---------------------------------------------------------------------------------------------
# Tasks: fixed transformations of 8x8 images with values in [0, 1].

def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    return F.conv2d(x.unsqueeze(1), k[None, None], padding=1).squeeze(1)


def _noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


_CHECKER = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 == 0)

# name -> (transform(x, seed), description)
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor, int], torch.Tensor], str]] = {
    "invert": (lambda x, s: 1 - x, "inverted intensities"),
    "rot90": (lambda x, s: torch.rot90(x, 1, (1, 2)), "rotated 90 degrees"),
    "flipud": (lambda x, s: torch.flip(x, (1,)), "flipped upside down"),
    "fliplr": (lambda x, s: torch.flip(x, (2,)), "mirrored left-right"),
    "shift": (lambda x, s: torch.roll(x, (2, 2), (1, 2)), "shifted 2 pixels down-right, wrapped"),
    "blur": (lambda x, s: _blur(_blur(x)), "blurred twice with a 3x3 binomial kernel"),
    "noise": (lambda x, s: _noise(x, 0.25, s), "Gaussian noise, sigma 0.25"),
    "contrast": (lambda x, s: 0.4 + 0.2 * x, "low contrast on grey"),
    "occlude": (lambda x, s: x * (torch.arange(8) < 5).float()[None, :, None],
                "bottom three rows blanked"),
    "transpose": (lambda x, s: x.transpose(1, 2), "transposed"),
    "checker": (lambda x, s: torch.where(_CHECKER, x, 1 - x), "every other pixel inverted"),
    "rot270": (lambda x, s: torch.rot90(x, 3, (1, 2)), "rotated 270 degrees"),
}


# Where on a larger canvas each task's digits appear (task i gets POSITIONS[i]); the base sees
# digits at every one of these places. Like CLIP's tasks (different datasets), different tasks
# then activate partly different features.
POSITIONS = [(0, 0), (8, 8), (0, 8), (8, 0), (4, 4), (0, 4), (4, 0), (8, 4), (4, 8), (2, 2),
             (6, 6), (2, 6)]


def place(images: torch.Tensor, canvas: int, pos: tuple[int, int]) -> torch.Tensor:
    """Put 8x8 images on a ``canvas``x``canvas`` black canvas at offset ``pos``."""
    if canvas == 8:
        return images
    out = torch.zeros(len(images), canvas, canvas)
    out[:, pos[0]:pos[0] + 8, pos[1]:pos[1] + 8] = images
    return out


def apply_task(task: str, images: torch.Tensor, seed: int, canvas: int = 8,
               pos: tuple[int, int] = (0, 0)) -> torch.Tensor:
    if task not in TRANSFORMS:
        raise SuiteError(f"tiny-vision: unknown task '{task}'; known: {', '.join(TRANSFORMS)}")
    return place(TRANSFORMS[task][0](images, seed), canvas, pos).contiguous()


# ---------------------------------------------------------------------------------------------
# Sizes. "full" is the suite of record (docs/benchmarks.md); "smoke" is for the test suite.

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "seed": 0, "width": 16, "feat_dim": 512, "linear_features": True, "canvas": 8,
        "tasks": ["invert", "rot90", "flipud", "shift", "blur", "noise", "fliplr", "occlude"],
        "held_out": ["transpose", "checker"],
        "pretrain_steps": 800, "pretrain_lr": 1e-3, "batch": 64, "pretrain_augment": False,
        "probe_shots": 2, "probe_dim": 16, "probe_steps": 300, "head": "probe",
        "finetune_steps": 500, "finetune_lr": 1e-4, "finetune_only": None,
        "val_per_task": 100, "eval_per_task": 400,
    },
    "smoke": {
        "seed": 0, "width": 4, "feat_dim": 64, "linear_features": True, "canvas": 8,
        "tasks": ["invert", "flipud", "fliplr"],
        "held_out": ["transpose"],
        "pretrain_steps": 150, "pretrain_lr": 3e-3, "batch": 32, "pretrain_augment": False,
        "probe_shots": 2, "probe_dim": 8, "probe_steps": 100, "head": "probe",
        "finetune_steps": 80, "finetune_lr": 1e-3, "finetune_only": None,
        "val_per_task": 40, "eval_per_task": 120,
    },
}


def _digits(seed: int, n_eval: int, n_val: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = len(x) - n_eval - n_val
    if n_train < 200:
        raise SuiteError("tiny-vision: eval_per_task + val_per_task leave too few training images")
    return {"train": (x[:n_train], y[:n_train]),
            "val": (x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
            "test": (x[n_train + n_val:n_train + n_val + n_eval],
                     y[n_train + n_val:n_train + n_val + n_eval])}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild generic augmentation for pre-training: random 1-px shifts, noise and contrast."""
    n = len(x)
    if x.shape[-1] > 8:  # digits on a canvas: the 8x8 digit goes to a random task position
        grid = [(a, b) for a in (0, 4, 8) for b in (0, 4, 8)]
        out = torch.zeros_like(x)
        pos = torch.randint(len(grid), (n,), generator=gen).tolist()
        for i, k in enumerate(pos):
            a, b = grid[k]
            out[i, a:a + 8, b:b + 8] = x[i, :8, :8]
        return out
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, (dy, dx), (1, 2))
    scale = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=gen)
    x = x * scale + (1 - scale) * 0.5 * torch.rand(n, 1, 1, generator=gen)
    x = x + 0.1 * torch.rand(n, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _train(body: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
           lr: float, batch: int, seed: int, train_head: bool, augment: bool = False,
           only: list[str] | None = None) -> torch.optim.Adam:
    for name, p in body.named_parameters():
        p.requires_grad_(not only or any(name.startswith(f"{o}.") for o in only))
    params = [p for p in body.parameters() if p.requires_grad]
    params += list(head.parameters()) if train_head else []
    for p in head.parameters():
        p.requires_grad_(train_head)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    body.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        xb = _augment(x[idx], gen) if augment else x[idx]
        loss = F.cross_entropy(head(body(xb)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in body.parameters():
        p.requires_grad_(True)
    body.eval()
    return opt


def _probe(features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int,
           dim: int | None = None) -> nn.Linear:
    """A linear probe; with ``dim``, one that reads only a random ``dim``-dimensional
    subspace of the features (each task its own), composed back into one Linear layer."""
    torch.manual_seed(seed)
    proj = None
    if dim:
        q, _ = torch.linalg.qr(torch.randn(features.shape[1], dim))
        proj = q.T.contiguous()  # dim x feat
        features = features @ proj.T
    head = nn.Linear(features.shape[1], 10)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if proj is None:
        return head
    full = nn.Linear(proj.shape[1], 10)
    with torch.no_grad():
        full.weight.copy_(head.weight @ proj)
        full.bias.copy_(head.bias)
    return full


def _few_shot(y: torch.Tensor, shots: int) -> torch.Tensor:
    idx = [torch.nonzero(y == c).flatten()[:shots] for c in range(10)]
    return torch.cat(idx)


def build(out: Path, cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    seed = cfg["seed"]
    torch.manual_seed(seed)
    splits = _digits(seed, cfg["eval_per_task"], cfg["val_per_task"])
    xtr, ytr = splits["train"]
    canvas = cfg.get("canvas", 8)
    body = _new_body(cfg)
    pre_head = nn.Linear(cfg["feat_dim"], 10)
    _train(body, pre_head, place(xtr, canvas, (0, 0)), ytr, cfg["pretrain_steps"],
           cfg["pretrain_lr"], cfg["batch"], seed, train_head=True,
           augment=cfg.get("pretrain_augment", False) or canvas > 8)
    base_sd = copy.deepcopy(body.state_dict())
    save_model_folder(out / "base", base_sd, body.hf_config())
    save_file({k: v.detach().contiguous() for k, v in pre_head.state_dict().items()},
              str(out / "base" / "pretrain_head.safetensors"))
    log("tiny-vision: base pre-trained")
    names = {id(p): n for n, p in body.named_parameters()}
    tasks: list[TaskInfo] = []
    all_tasks = [(t, False) for t in cfg["tasks"]] + [(t, True) for t in cfg["held_out"]]
    for i, (task, held_out) in enumerate(all_tasks):
        tseed = seed * 1000 + i
        x_task = {s: apply_task(task, splits[s][0], tseed * 10 + j, canvas, POSITIONS[i])
                  for j, s in enumerate(("train", "val", "test"))}
        if cfg.get("head", "probe") == "probe":
            shots = _few_shot(ytr, cfg["probe_shots"])
            with torch.no_grad():
                feats = body(x_task["train"][shots])
            head = _probe(feats, ytr[shots], cfg["probe_steps"], tseed,
                          cfg.get("probe_dim"))
        else:  # the base's own pre-training head, shared by every task ("zero-shot head")
            head = copy.deepcopy(pre_head)
        (out / "heads").mkdir(exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                  str(out / "heads" / f"{task}.safetensors"))
        expert = _new_body(cfg)
        expert.load_state_dict(base_sd)
        enames = {id(p): n for n, p in expert.named_parameters()}
        opt = _train(expert, head, x_task["train"], ytr, cfg["finetune_steps"],
                     cfg["finetune_lr"], cfg["batch"], common.finetune_seed(cfg, tseed),
                     train_head=False,
                     only=cfg.get("finetune_only"))
        save_model_folder(out / "experts" / task, expert.state_dict(),
                          {**expert.hf_config(), "task": task, "finetuned_from": "base"},
                          optimizer=opt, names=enames)
        save_split(out / "data" / task / "val.safetensors",
                   {"inputs": x_task["val"], "labels": splits["val"][1]})
        save_split(out / "data" / task / "test.safetensors", {"inputs": x_task["test"]})
        save_split(out / "data" / task / "labels.safetensors", {"labels": splits["test"][1]})
        tasks.append(TaskInfo(task, held_out, TRANSFORMS[task][1]))
        log(f"tiny-vision: expert '{task}' fine-tuned")
    del names
    return {"tasks": common.task_dicts(tasks)}


class VisionSuite(common.SizedSuite):
    """A built tiny-vision suite: load models, evaluate a body on any task with its head."""

    kind = "tiny-vision"

    def __init__(self, info: SuiteInfo) -> None:
        super().__init__(info)
        self._heads: dict[str, nn.Linear] = {}
        self._data: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def new_model(self, depth: int | None = None) -> TinyConvNet:
        """A body of the suite's config, of ``depth`` convolutions when given (a data-flow
        path changes the depth)."""
        cfg = self.info.config
        return _new_body(cfg if depth is None else {**cfg, "depth": depth}).eval()

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.info.base_dir)

    def expert_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return load_state_dict(self.info.expert_dir(task))

    def model_depth(self, names: Iterable[str]) -> int:
        """The convolutions of a body with these tensor names (its last block projects)."""
        blocks = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
        depth = blocks - 1 if blocks else int(self.info.config.get("depth", 3))
        if depth < 2:
            raise SuiteError(f"tiny-vision: a body of {blocks} blocks; it needs at least 3")
        return depth

    @staticmethod
    def check_fit(shapes: Mapping[str, Any], model: TinyConvNet) -> None:
        """A state dict of these tensors fills ``model`` exactly, or a one-line
        :class:`SuiteError` (a path whose blocks do not chain has the wrong shapes)."""
        have = model.state_dict()
        problems = [f"size mismatch for {n}: copying a param with shape {list(shapes[n])}, "
                    f"the body has {list(t.shape)}"
                    for n, t in have.items() if n in shapes and tuple(shapes[n]) != t.shape]
        missing = [n for n in have if n not in shapes]
        unexpected = [n for n in shapes if n not in have]
        if missing:
            problems.append(f"Missing key(s): {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"Unexpected key(s): {', '.join(unexpected[:3])}")
        if problems:
            raise SuiteError(f"tiny-vision: the state dict does not fit a body of depth "
                             f"{model.depth}: {problems[0]}")

    def _model(self, state_dict: dict[str, torch.Tensor]) -> TinyConvNet:
        """A body of the state dict's own depth (a data-flow path changes it) holding it; a
        path whose blocks do not chain (shapes) is refused in one line."""
        model = self.new_model(self.model_depth(state_dict))
        self.check_fit({n: tuple(t.shape) for n, t in state_dict.items()}, model)
        model.load_state_dict(state_dict)
        return model

    def head(self, task: str) -> nn.Linear:
        if task not in self._heads:
            sd = read_state_dict(self.info.path / "heads" / f"{task}.safetensors")
            head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
            head.load_state_dict(sd)
            self._heads[task] = head.eval()
        return self._heads[task]

    def labeled(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for ``val`` or ``test`` (test labels come from labels.safetensors)."""
        key = (task, split)
        if key not in self._data:
            if split == "val":
                d = load_split(self.info.data_file(task, "val"))
                self._data[key] = (d["inputs"], d["labels"])
            else:
                x = load_split(self.info.data_file(task, "test"))["inputs"]
                y = load_split(self.info.data_file(task, "labels"))["labels"]
                self._data[key] = (x, y)
        return self._data[key]

    @torch.no_grad()
    def evaluate(self, state_dict: dict[str, torch.Tensor], tasks: list[str] | None = None,
                 split: str = "test", limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Accuracy of a body (state dict) on each task with that task's head, and the
        per-example hits (``correct``, for the bootstrap intervals)."""
        return self.evaluate_model(self._model(state_dict), tasks, split, limit)

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module, tasks: list[str] | None = None,
                       split: str = "test", limit: int | None = None
                       ) -> dict[str, dict[str, Any]]:
        """:meth:`evaluate` of a built body (a search merges each candidate into one in
        place)."""
        out: dict[str, dict[str, Any]] = {}
        for task in tasks or [t.name for t in self.info.tasks]:
            x, y = self.labeled(task, split)
            if limit is not None:
                x, y = x[:limit], y[:limit]
            hit = self.head(task)(model(x)).argmax(1) == y
            out[task] = {"accuracy": float(hit.float().mean()), "mean_length": 1.0,
                         "correct": hit.tolist()}
        return out

    def general_metrics(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy on clean digits with the pre-training head (what merging may forget)."""
        model = self._model(state_dict)
        sd = read_state_dict(self.info.base_dir / "pretrain_head.safetensors")
        head = nn.Linear(sd["weight"].shape[1], 10)
        head.load_state_dict(sd)
        x, y = self.labeled(self.info.tasks[0].name, "test")
        del x
        clean = place(_digits(self.info.config["seed"], self.info.config["eval_per_task"],
                              self.info.config["val_per_task"])["test"][0],
                      self.info.config.get("canvas", 8), (0, 0))
        with torch.no_grad():
            acc = float((head(model(clean)).argmax(1) == y).float().mean())
        return {"clean_accuracy": acc}

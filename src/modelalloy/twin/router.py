"""The Twin-Merging router: a small MLP that predicts an input's source task.

Paper and official code (``discriminative/router.py::SimpleMLP``): the input is e(x), the mean
over tokens of the shared model's last hidden state; the MLP is::

    d → 2d (BatchNorm, LeakyReLU, dropout 0.5) → 2d (BatchNorm, LeakyReLU, dropout 0.5) → K
    gates w = softmax(router(e(x)))         Σ_k w_k = 1

trained with cross-entropy to predict the task the input came from (Adam, lr 5e-4, batch 1024,
50 epochs, the best-accuracy checkpoint on held-out examples). The official code selects the
checkpoint on the tasks' test inputs; we hold out a fraction of the validation split instead
(``holdout``), so no test input is seen before evaluation, and break ties in accuracy by the
lower held-out cross-entropy (the official Trainer keeps the first best epoch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelalloy.errors import MethodError


class TwinRouter(nn.Module):
    """router(e) -> K logits; :meth:`gates` gives softmax weights that sum to one."""

    def __init__(self, dim: int, num_tasks: int, hidden: int | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.dim, self.num_tasks, self.hidden = dim, num_tasks, hidden
        self.fc1 = nn.Linear(dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, num_tasks)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.leaky_relu(self.bn1(self.fc1(e.float()))))
        x = self.dropout(F.leaky_relu(self.bn2(self.fc2(x))))
        return self.out(x)

    @torch.no_grad()
    def gates(self, e: torch.Tensor) -> torch.Tensor:
        if e.dim() != 2 or e.shape[1] != self.dim:
            raise MethodError(f"twin router: expects embeddings of width {self.dim}, got shape "
                              f"{tuple(e.shape)}; the router does not match the shared model")
        return torch.softmax(self.eval()(e), dim=-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TwinRouter:
        hidden, dim = state["fc1.weight"].shape
        router = cls(int(dim), int(state["out.weight"].shape[0]), int(hidden))
        router.load_state_dict(state)
        return router.eval()


@dataclass
class RouterReport:
    train_accuracy: float
    holdout_accuracy: float
    best_epoch: int
    epochs: int
    examples: int


def train_router(embeddings: torch.Tensor, labels: torch.Tensor, num_tasks: int, *,
                 epochs: int = 50, lr: float = 5e-4, batch_size: int = 1024,
                 holdout: float = 0.2, seed: int = 0, hidden: int | None = None
                 ) -> tuple[TwinRouter, RouterReport]:
    """Fit the router to (embedding, task index) pairs; keep the best held-out checkpoint.
    ``hidden`` is the MLP's width (default 2d, the paper's).

    Runs on one intra-op thread: the MLP is small, and several threads on a busy machine made
    each BatchNorm call wait (tens of ms for a 16-row batch)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(embeddings, labels, num_tasks, epochs, lr, batch_size, holdout, seed,
                      hidden)
    finally:
        torch.set_num_threads(threads)


def _train(embeddings: torch.Tensor, labels: torch.Tensor, num_tasks: int, epochs: int,
           lr: float, batch_size: int, holdout: float, seed: int, hidden: int | None
           ) -> tuple[TwinRouter, RouterReport]:
    if embeddings.dim() != 2 or len(embeddings) != len(labels) or len(labels) < 2:
        raise MethodError("twin router: need at least two (embedding, task) examples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_tasks:
        raise MethodError(f"twin router: task labels must be in 0..{num_tasks - 1}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    n_hold = int(round(holdout * len(labels))) if holdout > 0 else 0
    hold, train = perm[:n_hold], perm[n_hold:]
    x, y = embeddings.float(), labels.long()
    router = TwinRouter(x.shape[1], num_tasks, hidden)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    best_acc, best_ce, best_state, best_epoch = -1.0, float("inf"), copy.deepcopy(
        router.state_dict()), 0
    check = hold if n_hold else train
    for epoch in range(1, epochs + 1):
        router.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            loss = F.cross_entropy(router(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc, ce = _scores(router, x[check], y[check])
        # best accuracy (the paper's criterion); among equal accuracies the lower held-out CE:
        # on tiny data the accuracy saturates early, and the first epoch to reach it gives
        # soft gates that mix the experts (tiny-lm: 74.6 against 98.1 with hard routing)
        if (acc, -ce) > (best_acc, -best_ce):
            best_acc, best_ce = acc, ce
            best_state, best_epoch = copy.deepcopy(router.state_dict()), epoch
    router.load_state_dict(best_state)
    report = RouterReport(train_accuracy=_scores(router, x[train], y[train])[0],
                          holdout_accuracy=best_acc, best_epoch=best_epoch, epochs=epochs,
                          examples=len(labels))
    return router.eval(), report


@torch.no_grad()
def _scores(router: TwinRouter, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, cross-entropy) of the router on (x, y)."""
    logits = router.eval()(x)
    return float((logits.argmax(-1) == y).float().mean()), float(F.cross_entropy(logits, y))

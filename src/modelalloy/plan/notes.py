"""One-line notes on a planned merge that ``modelalloy plan`` prints: where, under mergekit's
conventions, modelalloy's result will knowingly differ from mergekit's. They are known from
the recipe alone, before any tensor is read (the merge summary then names the tensors)."""

from __future__ import annotations

from modelalloy.plan.planner import MergePlan

# method -> what differs from mergekit on purpose (docs/recipes.md, "Against mergekit")
MERGEKIT_DIFFERENCES = {
    "model_stock": (
        "model_stock: mergekit's t = N·cos θ/(1 + (N−1)·cos θ) leaves [0, 1] in tensors whose "
        "task vectors point apart (cos θ < 0), extrapolating away from the fine-tunes; "
        "modelalloy keeps t in [0, 1], so those tensors will differ from mergekit's (the merge "
        "summary names them)"),
}


def plan_notes(plan: MergePlan) -> list[str]:
    """The notes for ``plan`` (none under ``conventions: paper``, the papers' own results)."""
    recipe = plan.recipe
    if recipe is None or recipe.conventions != "mergekit":
        return []
    note = MERGEKIT_DIFFERENCES.get(plan.spec.name)
    return [note] if note else []

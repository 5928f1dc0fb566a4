"""task_arithmetic_chunks: Expert Merging++'s chunk coefficients written in the recipe."""

from __future__ import annotations

import pytest
import torch

import modelalloy
from modelalloy.errors import ModelAlloyError
from modelalloy.search.runs import chunk_setting


def test_chunk_coefficients_scale_contiguous_slices_by_hand():
    base = {"a.weight": torch.tensor([1.0, 1.0, 1.0, 1.0]), "a.bias": torch.tensor([0.5])}
    ex1 = {"a.weight": torch.tensor([2.0, 3.0, 4.0, 5.0]), "a.bias": torch.tensor([1.5])}
    ex2 = {"a.weight": torch.tensor([0.0, 1.0, 2.0, 1.0]), "a.bias": torch.tensor([2.5])}
    recipe = {"merge_method": "task_arithmetic_chunks", "base_model": "b",
              "models": [{"model": "e1", "parameters": {"chunks": [
                  {"filter": "a.weight", "value": "2 3"}, {"value": ""}]}},
                  {"model": "e2", "parameters": {"chunks": [
                      {"filter": "a.weight", "value": "0.5 1 7"}, {"value": ""}]}}]}
    out = modelalloy.merge(recipe, sources={"b": base, "e1": ex1, "e2": ex2})
    # e1: τ = (1, 2, 3, 4), chunks of 2 scaled 2, 3; e2: τ = (−1, 0, 1, 0), chunks of
    # ⌈4/3⌉ = 2 entries -> 2 slices scaled 0.5, 1 (the third coefficient unused)
    expect = torch.tensor([1 + 2 * 1 + 0.5 * -1, 1 + 2 * 2 + 0.5 * 0, 1 + 3 * 3 + 1 * 1,
                           1 + 3 * 4 + 1 * 0])
    assert torch.equal(out["a.weight"], expect)
    assert torch.equal(out["a.bias"], base["a.bias"])  # no coefficients: the base


def test_bad_chunks_and_the_written_setting():
    base = {"a.weight": torch.ones(2)}
    recipe = {"merge_method": "task_arithmetic_chunks", "base_model": "b",
              "models": [{"model": "e", "parameters": {"chunks": "1 x"}}]}
    with pytest.raises(ModelAlloyError, match="numbers separated by spaces"):
        modelalloy.merge(recipe, sources={"b": base, "e": base})
    # a tensor whose name holds a coefficient tensor's name gets its own (empty) entry
    alphas = {"head.weight": torch.tensor([[0.25, 0.5]])}
    entries = chunk_setting(alphas, 0, ["head.weight", "cls_head.weight"], "t")
    assert entries == [{"filter": "cls_head.weight", "value": ""},
                       {"filter": "head.weight", "value": "0.25 0.5"}, {"value": ""}]

"""OTA's TIES option (merge: ties) against numbers worked out by hand on small tensors."""

from __future__ import annotations

import pytest
import torch

from modelalloy import merge_state_dicts
from modelalloy.errors import ModelAlloyError

# One row of 6 entries, 3 experts, base 0 (so τ_k = θ_k). Second moments v; FFG keeps an entry
# when v·τ² ≥ t_k (t = 0.5 for every model below).
BASE = torch.zeros(1, 6)
TAUS = [torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0]]),
        torch.tensor([[1.0, 2.0, -1.0, 4.0, 1.0, -1.0]]),
        torch.tensor([[-3.0, 1.0, -1.0, 1.0, 1.0, 1.0]])]
VS = [torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.1]]),
      torch.tensor([[1.0, 0.1, 1.0, 1.0, 0.1, 0.1]]),
      torch.tensor([[1.0, 1.0, 0.1, 1.0, 1.0, 0.1]])]
# saliency v·τ²:             e0        e1          e2          e3         e4         e5
#   expert 0:                 4          1           9          0.25       4          0.1
#   expert 1:                 1          0.4         1          16         0.1        0.1
#   expert 2:                 9          1           0.1        1          1          0.1
# masked τ̂ (t = 0.5):
#   expert 0:                 2         -1           3          0         -2          0
#   expert 1:                 1          0          -1          4          0          0
#   expert 2:                -3          1           0          1          1          0
# Σ τ̂:                        0          0           2          5         -1          0
# elected sign (zero sums take the majority sign of the tensor: sign(0+0+1+1-1+0) = +1):
#                            +1         +1          +1         +1         -1         +1
# agreeing entries:          2, 1       1           3          4, 1       -2         none
# disjoint mean:             1.5        1           3          2.5        -2         0
EXPECT = torch.tensor([[1.5, 1.0, 3.0, 2.5, -2.0, 0.0]])


def _merge(**params):
    experts = [{"w": BASE + t} for t in TAUS]
    stats = {"exp_avg_sq": [{"w": v} for v in VS]}
    return merge_state_dicts("ota", {"w": BASE}, experts, stats=stats, merge="ties",
                             threshold=[0.5, 0.5, 0.5], **params)["w"]


def test_ota_ties_by_hand():
    torch.testing.assert_close(_merge(), EXPECT)


def test_ota_ties_with_a_base_offset():
    base = torch.full((1, 6), 10.0)
    experts = [{"w": base + t} for t in TAUS]
    out = merge_state_dicts("ota", {"w": base}, experts,
                            stats={"exp_avg_sq": [{"w": v} for v in VS]}, merge="ties",
                            threshold=[0.5, 0.5, 0.5])["w"]
    torch.testing.assert_close(out, base + EXPECT)


def test_ota_ties_trim_by_hand():
    # ties_density 0.5 keeps int(0.5·6) = 3 largest-|·| entries of each masked τ̂:
    #   expert 0: [2, -1, 3, 0, -2, 0] -> 3, then 2 and -2 (|2| ties: both kept, 3 in all)
    #             -> [2, 0, 3, 0, -2, 0]
    #   expert 1: [1, 0, -1, 4, 0, 0] -> [1, 0, -1, 4, 0, 0]
    #   expert 2: [-3, 1, 0, 1, 1, 0] -> -3, then the first two of the tied 1s (index order)
    #             -> [-3, 1, 0, 1, 0, 0]
    # Σ: [0, 1, 2, 5, -2, 0]; majority sign(0+1+1+1-1+0) = +1 -> γ = [+, +, +, +, -, +]
    # agreeing: e0 {2, 1} -> 1.5; e1 {1} -> 1; e2 {3} -> 3; e3 {4, 1} -> 2.5; e4 {-2}; e5 none
    torch.testing.assert_close(_merge(ties_density=0.5),
                               torch.tensor([[1.5, 1.0, 3.0, 2.5, -2.0, 0.0]]))
    # ties_density 1/6 keeps one entry each: expert 0: 3 (e2); expert 1: 4 (e3); expert 2: -3 (e0)
    # Σ = [-3, 0, 3, 4, 0, 0], majority sign(-1+0+1+1) = +1 -> γ = [-, +, +, +, +, +]
    torch.testing.assert_close(_merge(ties_density=1 / 6),
                               torch.tensor([[-3.0, 0.0, 3.0, 4.0, 0.0, 0.0]]))


def test_ota_ties_fallback_to_average_where_every_model_is_masked():
    # entry 5 is masked for every model: base (0) by default, the plain average otherwise
    out = _merge(fallback_to_base=False)
    expect = EXPECT.clone()
    expect[0, 5] = sum(float(t[0, 5]) for t in TAUS) / 3
    torch.testing.assert_close(out, expect)


def test_ota_ties_without_masking_is_plain_ties():
    experts = [{"w": BASE + t} for t in TAUS]
    stats = {"exp_avg_sq": [{"w": v} for v in VS]}
    ota = merge_state_dicts("ota", {"w": BASE}, experts, stats=stats, merge="ties",
                            ties_density=0.5)["w"]
    ties = merge_state_dicts("ties", {"w": BASE}, experts, density=0.5)["w"]
    torch.testing.assert_close(ota, ties)


def test_ota_ties_needs_a_base():
    experts = [{"w": t.clone()} for t in TAUS]
    with pytest.raises(ModelAlloyError, match="needs a base"):
        merge_state_dicts("ota", None, experts,
                          stats={"exp_avg_sq": [{"w": v} for v in VS]}, merge="ties")

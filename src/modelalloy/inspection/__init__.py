"""``modelalloy inspect``: before merging, how much the experts' task vectors interfere.

- :mod:`.metrics`: the per-tensor sums (norms, inner products, sign conflicts, mask overlaps,
  surviving energy), additive so layers and families aggregate exactly.
- :mod:`.collect`: one streaming pass over a recipe's models, a tensor at a time.
- :mod:`.report`: terminal tables, PNG heatmaps and one HTML page.
"""

from modelalloy.inspection.collect import inspect_recipe
from modelalloy.inspection.metrics import TensorSums, tensor_sums

__all__ = ["TensorSums", "inspect_recipe", "tensor_sums"]

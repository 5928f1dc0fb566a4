"""Multi-stage recipes (mergekit-multi's format): named merges whose models may be earlier
merges, run in dependency order with intermediates in a work folder."""

from modelalloy.multistage.graph import Stage, load_stages, order_stages
from modelalloy.multistage.run import StageOutcome, run_stages

__all__ = ["Stage", "StageOutcome", "load_stages", "order_stages", "run_stages"]

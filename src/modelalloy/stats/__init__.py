"""Statistics from calibration data, collected through hooks on any torch module.

See docs/statistics.md for the on-disk format. Public API::

    collect_grams, collect_activations, collect_fisher, collect_stats -> Statistic
    save_stats, load_stats, StatsReader, stats_path
"""

from modelalloy.stats.collect import (
    KINDS,
    Statistic,
    collect_activations,
    collect_fisher,
    collect_grams,
    collect_stats,
    global_norm,
)
from modelalloy.stats.io import StatsReader, load_stats, save_stats, stats_path

__all__ = ["KINDS", "Statistic", "StatsReader", "collect_activations", "collect_fisher",
           "collect_grams", "collect_stats", "global_norm", "load_stats", "save_stats",
           "stats_path"]

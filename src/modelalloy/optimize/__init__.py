"""The merge optimizers: the learners (AdaMerging, Expert Merging, Self Positioning,
Sens-Merging), the searches (``evolve``, ``map``, ``layerwise_search``), Frank-Wolfe merging, the
search space of a recipe template and the in-memory candidate merge. ``modelalloy optimize``
(:mod:`modelalloy.search`) runs them against an objective.
"""

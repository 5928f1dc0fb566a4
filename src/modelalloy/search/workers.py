"""Scoring candidates: in this process, or on Ray workers that each hold the models once.

A candidate is a genome (unit coordinates of the search space), ``{"genome": [...],
"fidelity": f}`` (scored on a share f of the data), or a whole recipe dict (what a learner
produced). :func:`score_candidate` merges it in memory, straight into the objectives' live
models (:func:`merge_into`: only the tensors that changed since the last candidate are merged
and written), or into a state dict for ``python:`` objectives (:func:`merge_candidate`), and
scores it. With ``workers > 1`` (or ``--ray-address``) the models go into Ray's object store
once, as numpy arrays that workers map without copying, and each worker (one CPU, one torch
thread) scores candidates; results come back in the order the candidates were given, so a
search does not depend on the number of workers.
"""

from __future__ import annotations

import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modelalloy.errors import OptimizeError
from modelalloy.optimize.candidate import (
    LiveFor,
    ModelPool,
    merge_candidate,
    merge_into,
    merge_staged,
)
from modelalloy.optimize.space import SearchSpace, StagedRecipe
from modelalloy.search.objectives import Objectives

Candidate = Sequence[float] | Mapping[str, Any]
# a batch goes to the Ray workers in this many chunks per worker (balance against round trips)
CHUNKS_PER_WORKER = 2


class TrialFailed(Exception):
    """Candidate ``index`` of a batch failed; ``done`` holds the results before it."""

    def __init__(self, index: int, message: str, done: list[tuple[dict[str, float], float]]):
        super().__init__(message)
        self.index, self.message, self.done = index, message, done


def candidate_recipe(space: SearchSpace, candidate: Candidate) -> Any:
    from modelalloy.recipe.load import recipe_from_dict

    if isinstance(candidate, Mapping) and "genome" in candidate:
        # keys besides the genome and its fidelity belong to the space (PS then DFS: "ps")
        extra = {k: v for k, v in candidate.items() if k not in ("genome", "fidelity")}
        return space.recipe(list(candidate["genome"]), **extra)
    if isinstance(candidate, Mapping):
        return recipe_from_dict(dict(candidate), source=space.source, base_dir=space.base_dir)
    return space.recipe(list(candidate))


def score_candidate(space: SearchSpace, objectives: Objectives, pool: ModelPool,
                    candidate: Candidate) -> tuple[dict[str, float], float]:
    """(scores, seconds) of one candidate."""
    start = time.perf_counter()
    recipe = candidate_recipe(space, candidate)
    fidelity = float(candidate.get("fidelity", 1.0)) if isinstance(candidate, Mapping) else 1.0
    if objectives.takes_modules:
        scores = objectives.score_live(lambda live: merge_live(recipe, pool, live), fidelity)
    else:
        state_dict = (merge_staged(recipe, pool) if isinstance(recipe, StagedRecipe)
                      else merge_candidate(recipe, pool))
        scores = objectives.score(state_dict, fidelity)
    return scores, time.perf_counter() - start


def merge_live(recipe: Any, pool: ModelPool, live: LiveFor) -> torch.nn.Module:
    """A recipe or staged recipe merged into the live model of its layout, in place."""
    if isinstance(recipe, StagedRecipe):
        return merge_staged(recipe, pool, live)  # type: ignore[no-any-return]
    return merge_into(recipe, pool, live)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def warm_up(space: Any, objectives: Objectives, pool: ModelPool) -> None:
    """A fresh worker's one-off costs, paid before its first trial: the objective's data (a
    suite's, read once), and one merge of the start candidate (compiled kernels loaded, the
    models' pages touched, the live models built; the re-merge caches are then cleared, so
    trials are unchanged). The objective is not called (a user metric may have side
    effects)."""
    objectives.prepare()
    try:
        recipe = candidate_recipe(space, space.x0())
        if objectives.takes_modules:
            for live in objectives.live_groups():
                merge_live(recipe, pool, live)
        else:
            merge_candidate(recipe, pool)
    except Exception:  # a bad template fails in its first trial, with the trial's error
        pass
    objectives.forget()
    pool.last.clear()
    pool.merged_tensors = pool.reused_tensors = 0


class LocalEvaluator:
    """Scores candidates one after the other in this process."""

    workers = 1

    def __init__(self, space: SearchSpace, objectives: Objectives, pool: ModelPool) -> None:
        self.space, self.objectives, self.pool = space, objectives, pool

    def evaluate(self, candidates: Sequence[Candidate]) -> list[tuple[dict[str, float], float]]:
        done: list[tuple[dict[str, float], float]] = []
        for i, cand in enumerate(candidates):
            try:
                done.append(score_candidate(self.space, self.objectives, self.pool, cand))
            except Exception as err:  # the user's objective, a bad candidate: keep the rest
                raise TrialFailed(i, _describe(err), done) from err
        return done

    def close(self) -> None:
        pass


# -- Ray --------------------------------------------------------------------------------------


def _to_numpy(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, Any]]:
    """Tensors as (dtype name, numpy array of their bits): what the object store maps."""
    out = {}
    for n, t in sd.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            out[n] = ("bfloat16", t.view(torch.int16).numpy())
        else:
            out[n] = (str(t.dtype).removeprefix("torch."), t.numpy())
    return out


def _from_numpy(packed: Mapping[str, tuple[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    with warnings.catch_warnings():  # read-only shared memory: never written to
        warnings.simplefilter("ignore", UserWarning)
        for n, (dtype, arr) in packed.items():
            t = torch.from_numpy(arr)
            out[n] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail in one line, quickly, when a ``host:port`` (or ``ray://host:port``) does not
    answer (``ray.init`` would wait and retry for a long while)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise OptimizeError(f"ray_address='{address}': write host:port, ray://host:port or "
                            "auto", options=("ray_address",))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise OptimizeError(f"ray_address='{address}': no Ray cluster answers there "
                            f"({err.strerror or err}); start one with `ray start --head` or "
                            "give no address for a local Ray",
                            options=("ray_address",)) from None


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise OptimizeError("parallel trials need Ray: pip install 'modelalloy[search]' "
                            "(or run with workers=1)", options=("workers",)) from None
    return ray


class RayEvaluator:
    """Scores candidates on ``workers`` Ray actors (a local Ray unless ``address``)."""

    def __init__(self, space: SearchSpace, objectives: Objectives, pool: ModelPool,
                 workers: int, address: str | None = None) -> None:
        ray = import_ray()
        if address:
            check_ray_address(address)
        self.workers = workers
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers, **kwargs)
            self._started = True
        refs = {path: ray.put(_to_numpy(sd)) for path, sd in pool.items()}

        @ray.remote(num_cpus=1)
        class Worker:
            def __init__(self, space: SearchSpace, objectives: Objectives,
                         refs: dict[str, Any]) -> None:
                from modelalloy.search.heap import keep_heap

                keep_heap()  # this process runs trials only: keep their memory between them
                torch.set_num_threads(1)
                self.space, self.objectives = space, objectives
                self.pool = ModelPool({p: _from_numpy(ray.get(r)) for p, r in refs.items()},
                                      threads=1)
                warm_up(space, objectives, self.pool)

            def ready(self) -> bool:
                return True

            def score(self, candidates: list[Candidate]) -> list[tuple[str, Any]]:
                out: list[tuple[str, Any]] = []
                for candidate in candidates:
                    try:
                        out.append(("ok", score_candidate(self.space, self.objectives,
                                                          self.pool, candidate)))
                    except Exception as err:
                        out.append(("error", _describe(err)))
                return out

        # refs inside a dict are not resolved by Ray: each worker maps them itself
        self.actors = [Worker.remote(space, objectives, refs) for _ in range(workers)]
        self._ray = ray
        # every worker started and warmed up before the first trial (not inside it)
        ray.get([a.ready.remote() for a in self.actors])
        from threadpoolctl import threadpool_limits

        # The driver's own linear algebra (CMA-ES, surrogates) is tiny, but numpy's OpenBLAS
        # threads spin for a while after every call: with a generation every few hundred ms
        # that was 0.2 of a core taken from the workers (on 2 cores, 1.4x instead of 1.7x).
        self._blas_limits = threadpool_limits(limits=1, user_api="blas")

    def evaluate(self, candidates: Sequence[Candidate]) -> list[tuple[dict[str, float], float]]:
        from ray.util import ActorPool

        # one call per worker and batch, not per candidate: a Ray round trip costs the driver,
        # the raylet and the worker CPU on the cores the trials run on (with short trials on
        # a 2-core machine that was the serial part); two chunks per worker keep them balanced
        cands = list(candidates)
        size = max(1, -(-len(cands) // (CHUNKS_PER_WORKER * len(self.actors))))
        chunks = [cands[i:i + size] for i in range(0, len(cands), size)]
        results = [r for part in ActorPool(self.actors).map(lambda a, c: a.score.remote(c),
                                                           chunks) for r in part]
        done: list[tuple[dict[str, float], float]] = []
        for i, (status, value) in enumerate(results):
            if status != "ok":
                raise TrialFailed(i, value, done)
            done.append((value[0], value[1]))
        return done

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        if self._started:
            self._ray.shutdown()
        self._blas_limits.restore_original_limits()


def make_evaluator(space: SearchSpace, objectives: Objectives, pool: ModelPool, workers: int,
                   address: str | None) -> LocalEvaluator | RayEvaluator:
    if workers < 1:
        raise OptimizeError(f"workers={workers}: must be at least 1", options=("workers",))
    if workers == 1 and not address:
        return LocalEvaluator(space, objectives, pool)
    return RayEvaluator(space, objectives, pool, workers, address)

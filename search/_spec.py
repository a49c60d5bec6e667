"""What a study spec holds: its sections as frozen dataclasses, each validating its values
(read from a TOML file by ``_spec_file``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spaces import SearchSpace, check_range

OBJECTIVES: dict[str, str] = {
    "quality": "maximize",
    "latency_ms": "minimize",
    "size_mb": "minimize",
}
SAMPLERS = ("nsga2", "tpe", "gp", "random")
SEARCH_BACKENDS = ("optuna", "ray")  # optuna: trials in this process, on Optuna's own loop
MAX_THREADS = 1024
MAX_BATCH = 1 << 16  # the largest batch an exported program accepts
MAX_SEQUENCE = 1 << 16
MAX_SEED = 2**32 - 1  # numpy's seed range, which the samplers use
# a study name is a file name: its journal is runs/NAME/journal.log
_SAFE_NAME = re.compile(r"[^\W][\w.+ -]{0,99}")


@dataclass(frozen=True)
class SamplerSpec:
    """Which Optuna sampler proposes recipes; ``population_size`` is NSGA-II's generation size."""

    name: str = "nsga2"
    population_size: int = 8

    def __post_init__(self) -> None:
        _one_of("name", self.name, SAMPLERS)
        _at_least("population_size", self.population_size, 2)


@dataclass(frozen=True)
class FinetuneSpec:
    """The recovery fine-tune (distillation) after structural changes, and the trial budget
    (``trial_timeout_s``; ``inf`` in TOML, None from Python, sets none); ``threads`` 0 uses
    torch's count."""

    steps: int = 300
    learning_rate: float = 5e-4
    trial_timeout_s: float | None = 900.0
    threads: int = 0

    def __post_init__(self) -> None:
        _at_least("steps", self.steps, 0)
        check_range("threads", self.threads, 0, MAX_THREADS)
        check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        if self.trial_timeout_s is not None:
            check_range("trial_timeout_s", self.trial_timeout_s, 0.0, math.inf, low_open=True,
                      infinite=True)
            if math.isinf(self.trial_timeout_s):  # no budget
                object.__setattr__(self, "trial_timeout_s", None)


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured: target, batch size (0: the example input's), sequence length
    of token inputs (0: the example input's), threads, calls, the spread of the speedup
    across rounds above which a measurement is repeated, and whether a trial's structure is
    timed (untrained) while it fine-tunes (``overlap``)."""

    target: str = "cpu-x86"
    batch_size: int = 0
    sequence_length: int = 0
    threads: int = 1
    min_calls: int = 300
    min_seconds: float = 1.0
    max_spread: float = 0.05
    lowering: str = "aoti"
    overlap: bool = True

    def __post_init__(self) -> None:
        from ..kernels import LOWERINGS, TARGETS

        _one_of("target", self.target, TARGETS)
        _one_of("lowering", self.lowering, LOWERINGS)
        check_range("batch_size", self.batch_size, 0, MAX_BATCH)
        check_range("sequence_length", self.sequence_length, 0, MAX_SEQUENCE)
        check_range("threads", self.threads, 1, MAX_THREADS)
        check_range("min_calls", self.min_calls, 10, 10**7)
        check_range("min_seconds", self.min_seconds, 0.0, 600.0)
        check_range("max_spread", self.max_spread, 0.0, 10.0, low_open=True)


@dataclass(frozen=True)
class ConstraintsSpec:
    """Feasibility rules; ``max_quality_drop`` is in the metric's units (0.01 = one point)."""

    max_quality_drop: float = 0.01

    def __post_init__(self) -> None:
        check_range("max_quality_drop", self.max_quality_drop, 0.0, float("inf"))


@dataclass(frozen=True)
class StoppingSpec:
    """Constraint-aware stopping. The fine-tune is checked at ``rungs`` (fractions of its steps)
    on the first ``slice_samples`` of the validation data; a trial whose projected quality
    stays below the feasible region by more than ``slack`` is stopped (the rule: README,
    "Stopping early"). A trial whose figures are known before its fine-tune (an identical
    structure timed earlier) and are dominated by a feasible trial of at least the teacher's
    quality skips it (``skip_dominated``); one that ends above the quality limit is stopped
    then, not timed after its fine-tune (``time_infeasible`` false). With ``promote_steps``, up
    to ``promotions`` trials of the study whose projection at the last rung falls short of the
    limit by less than ``promote_margin``, and whose structure would extend the feasible front,
    fine-tune for ``promote_steps`` in all instead (a promotion). With ``halving`` (eta, at
    least 2; 0: off), a trial at a rung goes on only while it ranks in the best 1 / eta of the
    study's trials at that rung (successive halving on non-dominated rank of slice quality,
    latency and size of the structure: ``halving_reason``)."""

    enabled: bool = True
    rungs: list = field(default_factory=lambda: [0.25, 0.5])
    slack: float = 0.005
    slice_samples: int = 2000
    skip_dominated: bool = True
    time_infeasible: bool = False
    promote_steps: int = 0
    promotions: int = 2
    promote_margin: float = 0.01
    halving: int = 0

    def __post_init__(self) -> None:
        _at_least("promote_steps", self.promote_steps, 0)
        if isinstance(self.halving, bool) or not isinstance(self.halving, int) or not (
                self.halving == 0 or self.halving >= 2):
            raise ValueError(f"halving must be 0 (off) or an integer >= 2. "
                             f"Got {self.halving!r}.")
        _at_least("promotions", self.promotions, 0)
        check_range("promote_margin", self.promote_margin, 0.0, 1.0)
        rungs = tuple(self.rungs)
        for value in rungs:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"rungs must be numbers in (0, 1). Got {value!r}.")
            check_range("rungs", value, 0.0, 1.0, low_open=True)
        object.__setattr__(self, "rungs", tuple(sorted(rungs)))
        check_range("slack", self.slack, 0.0, 1.0)
        _at_least("slice_samples", self.slice_samples, 1)


@dataclass(frozen=True)
class CandidatesSpec:
    """The predicted tier: ``count`` distinct candidates of the space scored by the proxies
    (0: off, every trial is measured), proposed by the spec's sampler (NSGA-II with
    ``population`` per generation); the elastic student they are sliced from trains
    ``elastic_steps`` sandwich steps at ``elastic_learning_rate``. The measured tier runs
    the candidates predicted within ``margin`` of the quality limit that add most to the
    measured front, counting that a fine-tune from the slice recovers the fraction
    ``recovery`` of its predicted drop until measured candidates tell how much it does.
    While the study may promote (``[stopping] promote_steps`` beyond the candidates' steps),
    up to ``stopping.promotions`` candidates that only a promotion's recovery
    (``promoted_recovery``, until promoted candidates tell) brings within the margin are
    picked too: their rungs then decide the promotion. A measured candidate fine-tunes from
    its slice for ``finetune_steps`` (0: the ``[finetune]`` steps) at ``learning_rate``
    (the slice starts trained: it needs fewer steps, and a rate as high as a fine-tune from
    the teacher's would undo its training)."""

    count: int = 0
    population: int = 24
    elastic_steps: int = 700
    elastic_learning_rate: float = 2e-3
    margin: float = 0.002
    recovery: float = 0.3
    promoted_recovery: float = 0.7
    learning_rate: float = 2e-3
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        check_range("count", self.count, 0, 100_000)
        _at_least("population", self.population, 2)
        check_range("elastic_steps", self.elastic_steps, 0, 10**7)
        check_range("margin", self.margin, 0.0, 1.0)
        check_range("recovery", self.recovery, 0.0, 1.0)
        check_range("promoted_recovery", self.promoted_recovery, 0.0, 1.0)
        check_range("learning_rate", self.learning_rate, 0.0, 1.0, low_open=True)
        check_range("finetune_steps", self.finetune_steps, 0, 10**7)
        check_range("elastic_learning_rate", self.elastic_learning_rate, 0.0, 1.0,
                    low_open=True)


@dataclass(frozen=True)
class RaySpec:
    """The Ray Tune backend: cluster address, resources of one trial, concurrency, results.

    ``address`` empty starts Ray on this machine; ``"auto"`` or ``HOST:PORT`` joins a
    running cluster. ``cpu`` and ``gpu`` may be fractions. ``results`` is Tune's storage
    path (default ``runs/NAME/ray``). With ``time_on_target``, latency is measured on a node
    holding the custom resource ``target:TARGET``, one measurement per node at a time.
    """

    address: str = ""
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent_trials: int = 1
    results: str = ""
    time_on_target: bool = True

    def __post_init__(self) -> None:
        check_range("cpu", self.cpu, 0.0, 1024.0)
        check_range("gpu", self.gpu, 0.0, 64.0)
        _at_least("max_concurrent_trials", self.max_concurrent_trials, 1)


@dataclass(frozen=True)
class WorkerSpec:
    """Workers sharing one study in an RDB storage: a live worker's trial sends a heartbeat
    every ``heartbeat_s``; a trial silent for ``grace_s`` is failed and retried (at most
    ``max_retries`` times)."""

    heartbeat_s: int = 10
    grace_s: int = 60
    max_retries: int = 2

    def __post_init__(self) -> None:
        _at_least("heartbeat_s", self.heartbeat_s, 1)
        _at_least("max_retries", self.max_retries, 0)
        if not self.grace_s > self.heartbeat_s:
            raise ValueError(f"grace_s must be > heartbeat_s ({self.heartbeat_s}). "
                             f"Got {self.grace_s}.")


@dataclass(frozen=True)
class StudySpec:
    """One study: the task, what to search, how to judge and where to store it."""

    task: str
    name: str
    path: Path | None = None
    trials: int = 16
    time_budget_s: float | None = None
    seed: int = 0
    storage: str = ""
    backend: str = "optuna"
    objectives: tuple[str, ...] = ("quality", "latency_ms", "size_mb")
    task_options: dict[str, Any] = field(default_factory=dict)
    constraints: ConstraintsSpec = field(default_factory=ConstraintsSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    ray: RaySpec = field(default_factory=RaySpec)
    workers: WorkerSpec = field(default_factory=WorkerSpec)
    stopping: StoppingSpec = field(default_factory=StoppingSpec)
    candidates: CandidatesSpec = field(default_factory=CandidatesSpec)
    space: SearchSpace = field(default_factory=SearchSpace.default)
    seeds: tuple | str = "auto"

    def __post_init__(self) -> None:
        _at_least("trials", self.trials, 1)
        if self.time_budget_s is not None:
            check_range("time_budget_s", self.time_budget_s, 0.0, math.inf, low_open=True,
                      infinite=True)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_study_name(self.name)
        if isinstance(self.seeds, str):
            _one_of("seeds", self.seeds, ("auto",))
        else:
            object.__setattr__(self, "seeds", tuple(_seed_params(self.space, s)
                                                    for s in self.seeds))
        _one_of("backend", self.backend, SEARCH_BACKENDS)
        if not self.objectives:
            raise ValueError("needs at least one objective")
        for name in self.objectives:
            _one_of("objectives", name, tuple(OBJECTIVES))
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must not repeat. Got {list(self.objectives)}.")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def default_storage_path(self, runs_dir: Path | None = None) -> Path:
        """Where the study's journal lives unless ``storage`` says otherwise."""
        return (runs_dir or Path("runs")) / self.name / "journal.log"

    def ray_results_path(self) -> Path:
        """Where Ray Tune keeps the study's experiment (``ray.results`` or runs/NAME/ray)."""
        return Path(self.ray.results or Path("runs") / self.name / "ray").expanduser().resolve()


def _one_of(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}. Got {value!r}.")


def _at_least(name: str, value: Any, low: int) -> None:
    if not value >= low:
        raise ValueError(f"{name} must be >= {low}. Got {value!r}.")


def check_study_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a safe file name (letters, digits, ``_ . + -``
    and inner spaces; no path separator; at most 100 characters; not starting with a dot)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name[-1] in " .":
        raise ValueError(
            f"name must be a file name of letters, digits and _ . + - (not starting with . "
            f"or -, at most 100 characters): the study is stored in runs/NAME/. Got {name!r}."
        )


def _seed_params(space: SearchSpace, seed: Any) -> dict[str, Any]:
    """A seed recipe (sections of recipe keys, as in a recipe's JSON) as the dotted
    parameters of the searched space; a searched parameter it leaves out takes its config
    default. Raises ValueError when a value is outside the parameter's domain."""
    from ..spaces import Recipe

    searched = space.searched()
    if isinstance(seed, dict) and seed and all("." in str(k) for k in seed):
        for name, value in seed.items():  # already dotted (a spec built in Python)
            if name not in searched:
                raise ValueError(f"seeds: {name!r} is not a searched parameter; searched: "
                                 f"{', '.join(sorted(searched))}")
            _check_seed_value(name, searched[name], value)
        return dict(seed)
    params = space.params(Recipe.from_dict(seed))
    return {name: _check_seed_value(name, searched[name], value)
            for name, value in params.items()}


def _check_seed_value(name: str, domain: Any, value: Any) -> Any:
    if value not in domain.candidates() and not _in_domain(domain, value):
        raise ValueError(f"seeds: {name} = {value!r} is outside its domain {domain}")
    return value


def _in_domain(domain: Any, value: Any) -> bool:
    low, high = getattr(domain, "low", None), getattr(domain, "high", None)
    return (low is not None and isinstance(value, (int, float)) and not isinstance(value, bool)
            and low <= value <= high)

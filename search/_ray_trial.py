"""Inside the Ray trial actors: one trial run on a node, its latency measured there or on a
node of the target hardware, its result reported to Tune."""

from __future__ import annotations

import json
import math
import os

import ray
from ray import tune

from ._guide import guide_for
from ._measuring import measure_baseline
from ._record import json_safe
from ._spec import StudySpec
from ._task import load_task
from ._trial import TrialSettings, run_trial

RESULT_KEY = "paretoslim"
_loaded: dict[tuple, tuple] = {}  # per actor process: the task and its baseline, loaded once


def trainable(config: dict, spec: StudySpec) -> None:
    """Run the trial ``config`` describes (its params, number and guide) and report it."""
    key = (str(spec.path), spec.task, json.dumps(spec.task_options, sort_keys=True,
                                                 default=str))
    if key not in _loaded:
        task = load_task(spec.task, spec.base_dir, spec.task_options)
        _loaded[key] = (task, measure_baseline(task))
    task, baseline = _loaded[key]
    recipe = spec.space.recipe(config["params"])
    settings = TrialSettings.from_spec(spec)
    measure = TargetMeasure(spec, settings) if spec.ray.time_on_target else None
    if measure is not None and not measure.resource_available():
        measure = None  # no node of the target: measure where the trial runs
    result = run_trial(task, recipe, settings, baseline, measure=measure,
                       guide=guide_for(spec, config.get("guide")))
    node = ray.util.get_node_ip_address()
    metrics = dict(result.metrics)
    metrics["trained_on_node"] = node
    metrics["trained_in_process"] = os.getpid()  # the same for trials of a reused actor
    if result.ok:
        metrics["measured_on_node"] = measure.node if measure and measure.node else node
        metrics["measured_on_target"] = bool(measure and measure.node)
    values = {name: result.values.get(name, math.nan) for name in spec.objectives}
    payload = {"values": json_safe(values), "metrics": json_safe(metrics),
               "failure": result.failure, "stopped": result.stopped}
    tune.report({**values, RESULT_KEY: json.dumps(payload)})


class TargetMeasure:
    """Runs a latency job as a Ray task on a node holding the resource ``target:TARGET``.

    One unit of that resource per node means one measurement per node at a time; each job
    runs in a fresh worker process (``max_calls=1``) that has run no other model.
    """

    def __init__(self, spec: StudySpec, settings: TrialSettings):
        self.resource = f"target:{spec.latency.target}"
        self.timeout_s = settings.finetune.trial_timeout_s
        self.node: str | None = None

    def resource_available(self) -> bool:
        """Whether a live node of the cluster holds the target resource."""
        return any(node.get("Alive") and node.get("Resources", {}).get(self.resource)
                   for node in ray.nodes())

    def __call__(self, job):
        # DEFAULT: not inside the trial's placement group, which holds no target resource
        remote = ray.remote(num_cpus=0, resources={self.resource: 1}, max_calls=1,
                            max_retries=0, scheduling_strategy="DEFAULT")(_measure_here)
        ref = remote.remote(job)
        try:
            report, self.node = ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise TimeoutError(f"the latency measurement on a {self.resource} node took "
                               f"longer than {self.timeout_s:.0f} s") from None
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        return report


def _measure_here(job):
    from ..evaluators import run_latency_job

    return run_latency_job(job), ray.util.get_node_ip_address()

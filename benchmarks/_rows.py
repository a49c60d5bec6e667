"""What the benchmarks share: trial settings and one JSON line per row."""

from __future__ import annotations

import json
from typing import IO, Any

from paretoslim.search import FinetuneSpec, LatencySpec, TrialSettings


def trial_settings(steps: int, min_calls: int, batch_size: int = 64,
                   learning_rate: float | None = None) -> TrialSettings:
    """Trials as the benchmarks run them: timed on one thread at ``batch_size`` (64: the
    Fashion-MNIST study's), no time budget."""
    finetune = FinetuneSpec(steps=steps, trial_timeout_s=None)
    if learning_rate is not None:
        finetune = FinetuneSpec(steps=steps, trial_timeout_s=None, learning_rate=learning_rate)
    return TrialSettings(finetune, LatencySpec(batch_size=batch_size, threads=1,
                                               min_calls=min_calls))


def record(log: IO[str], name: str, recipe: dict | None, failure: str | None,
           seconds: float, metrics: dict[str, Any], columns: int) -> bool:
    """Append the row to ``log`` (flushed); print the failure as a table row of
    ``columns`` cells when there is one. Returns whether the row succeeded."""
    row = {"name": name, "recipe": recipe, "failure": failure, "seconds": seconds,
           **{k: v for k, v in metrics.items()
              if isinstance(v, (int, float, str, bool)) and k != "traceback"}}
    log.write(json.dumps(row) + "\n")
    log.flush()
    if failure:
        print(f"| {name} | failed: {failure} |" + " |" * (columns - 2), flush=True)
    return not failure

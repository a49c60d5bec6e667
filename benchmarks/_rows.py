"""What the Fashion-MNIST benchmarks share: trial settings and one JSON line per row."""

from __future__ import annotations

import json
from typing import IO, Any

from paretoslim.search import FinetuneSpec, LatencySpec, TrialSettings


def trial_settings(steps: int, min_calls: int) -> TrialSettings:
    """Trials as the benchmarks run them: batch 64 timed on one thread, no time budget."""
    return TrialSettings(FinetuneSpec(steps=steps, trial_timeout_s=None),
                         LatencySpec(batch_size=64, threads=1, min_calls=min_calls))


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

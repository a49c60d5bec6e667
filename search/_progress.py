"""Progress display of a running study: a bar over trials and one line per finished trial.

The bar is drawn only on a terminal; into a file or a pipe (a log), a plain line is written
when each trial starts instead of the bar's carriage-return frames."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from ..spaces._progress import LOG_EVERY_S, is_terminal, time_left
from ._figures import FIGURE_FORMATS


class _Counter:
    """A bar counting small units of work; ``close(count)`` writes the count reached."""

    def __init__(self, progress: StudyProgress, desc: str, total: int, initial: int):
        self.progress, self.desc, self.total = progress, desc, total
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (
            progress.enabled and progress.terminal), dynamic_ncols=True, file=sys.stderr,
            leave=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self, count: int) -> None:
        self.bar.close()
        self.progress.note(f"{self.desc}: {count} of {self.total}")


class StudyProgress:
    """Shows trials completed out of the target, the running trial's stage, and results."""

    def __init__(self, *, target: int, completed: int, enabled: bool = True,
                 terminal: bool | None = None):
        self.enabled = enabled
        self.current = ""
        # None: draw the bar when standard error is a terminal
        self.terminal = is_terminal(sys.stderr) if terminal is None else terminal
        self.bar = tqdm(total=target, initial=min(completed, target), desc="trials",
                        unit="trial", disable=not (enabled and self.terminal),
                        dynamic_ncols=True, file=sys.stderr)
        self.target, self.completed = target, min(completed, target)
        self._step_started = self._last_line = self._last_redraw = 0.0

    def _write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            if not self.terminal:
                sys.stdout.flush()  # a log shows each line when it happens

    def note(self, line: str) -> None:
        self._write(line)

    def stage(self, name: str) -> None:
        self.bar.set_postfix_str(f"{self.current} {name}".strip(), refresh=True)

    def fine_tune_step(self, done: int, total: int, *, unit: str = "fine-tune step") -> None:
        """The running trial's fine-tune (or other training, named by ``unit``) reached
        step ``done`` of ``total``: shown on the bar, and into a log at most every 30 s with
        an estimate of the time left."""
        now = time.monotonic()
        if done <= 1:
            self._step_started = self._last_line = now
        # the pace from the end of the first step: it also holds the first compilation
        left = time_left(now - self._step_started, done - 1, total - 1)
        text = f"{unit} {done}/{total}{left}"
        if self.terminal and now - self._last_redraw >= 0.5:
            self._last_redraw = now
            self.bar.set_postfix_str(f"{self.current} {text}", refresh=True)
        elif self.enabled and not self.terminal and now - self._last_line >= LOG_EVERY_S:
            self._last_line = now
            print(f"{self.current}  {text}", file=sys.stderr, flush=True)

    def start_trial(self, number: int, recipe) -> None:
        self.current = f"#{number} [{recipe.short()}]"
        self.stage("")
        if self.enabled and not self.terminal:
            print(f"trial {number:>3}  started ({self.completed}/{self.target} completed)  "
                  f"[{recipe.short()}]", file=sys.stderr, flush=True)

    def _count(self) -> None:
        self.bar.update(1)
        self.completed = min(self.completed + 1, self.target)

    def trial_done(self, number: int, result, feasible: bool, where: str = "") -> None:
        self._count()
        if not self.enabled:
            return
        m = result.metrics
        flag = "" if feasible else "  (quality drop above the limit)"
        if m.get("promoted"):
            flag += f"  (promoted to {m['finetune_steps']} fine-tune steps)"
        if m.get("latency_noisy"):
            flag += f"  (latency noisy: speedup spread {m['speedup_spread']:.0%})"
        quality, gain, latency, speedup, size, compression = (
            FIGURE_FORMATS[key].format(value) for key, value in (
                ("quality", m["quality"]), ("quality_drop", -m["quality_drop"]),
                ("latency_ms", m["latency_ms"]), ("speedup", m["speedup"]),
                ("size_mb", m["size_mb"]), ("compression", m["compression"])))
        self._write(
            f"trial {number:>3}  quality {quality} ({gain})  latency {latency} ms ({speedup})  "
            f"size {size} MB ({compression})  [{result.recipe.short()}]{where}{flag}"
        )

    def trial_failed(self, number: int, reason: str, where: str = "") -> None:
        self._write(f"trial {number:>3}  failed: {reason}{where}")

    def trial_stopped(self, number: int, reason: str, where: str = "") -> None:
        self._write(f"trial {number:>3}  {reason}{where}")

    def trial_reused(self, number: int, earlier: int) -> None:
        self._write(f"trial {number:>3}  same recipe as trial {earlier}, its figures reused")
        self._count()

    def set_completed(self, count: int) -> None:
        """Show ``count`` completed trials (e.g. counting other workers' trials)."""
        self.completed = min(count, self.target)
        if count != self.bar.n:
            self.bar.n = min(count, self.bar.total)
            self.bar.refresh()

    def counter(self, desc: str, total: int, initial: int = 0) -> _Counter:
        """A bar of its own for work counted in many small units (e.g. candidates scored);
        into a log, one line when it closes."""
        return _Counter(self, desc, total, initial)

    def close(self) -> None:
        self.bar.close()

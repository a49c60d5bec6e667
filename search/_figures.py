"""How figures and recipes are written in tables, pages and progress lines: one format each."""

from __future__ import annotations

import json
from typing import Any

from ..spaces import Recipe

FIGURE_FORMATS = {"quality": "{:.4f}", "quality_drop": "{:+.4f}", "latency_ms": "{:.3f}",
                  "speedup": "{:.2f}x", "size_mb": "{:.3f}", "compression": "{:.1f}x"}


def fmt(name: str, value: Any) -> str:
    """``value`` of figure ``name`` in its format (4 significant digits for other figures);
    empty for a missing, non-numeric or NaN value."""
    if not isinstance(value, (int, float)) or value != value:
        return ""
    return FIGURE_FORMATS.get(name, "{:.4g}").format(value)


def short_recipe(recipe: dict[str, Any]) -> str:
    """The short form of a stored recipe (its JSON when it no longer reads as a Recipe)."""
    try:
        return Recipe.from_dict(recipe).short()
    except (TypeError, ValueError):
        return json.dumps(recipe)

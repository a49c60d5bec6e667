"""The README's table of recipe parameters, written from the technique registry."""

from __future__ import annotations

from dataclasses import fields

from ._config import valid_values
from ._domains import Choice, Domain, Fixed, FloatRange
from ._space import default_domains
from ._technique import techniques


def parameter_table() -> str:
    """The markdown table of every recipe parameter: its default domain and valid values."""
    domains = default_domains()
    rows = ["| parameter | default domain | valid values |", "| --- | --- | --- |"]
    for t in techniques():
        for f in fields(t.config):
            name = f"{t.section}.{f.name}"
            default = _domain_text(domains[name], f.metadata.get("off", False))
            rows.append(f"| `space.{name}` | {default} | {valid_values(f)} |")
    return "\n".join(rows) + "\n"


def _domain_text(domain: Domain, off: bool) -> str:
    if isinstance(domain, FloatRange):
        step = f", step {domain.step}" if domain.step is not None else ""
        return f"{domain.low} to {domain.high}{step}"
    if isinstance(domain, Choice):
        return "any of " + ", ".join(f"`{v}`" for v in domain.values)
    assert isinstance(domain, Fixed)
    value = domain.value
    text = str(value).lower() if isinstance(value, bool) else (
        f"`{value}`" if isinstance(value, str) else str(value))
    return text + (" (off)" if off else "")

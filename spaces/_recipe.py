"""The Recipe: one point of the joint compression space, frozen and JSON-serializable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

QuantScheme = Literal["fp32", "bf16", "int8_dynamic", "int8_static"]
QUANT_SCHEMES: tuple[str, ...] = get_args(QuantScheme)


def _check_range(owner: str, name: str, value: float, low: float, high: float,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"The {name!r} parameter of {owner} must be a number. "
            f"Got {type(value).__name__} instead."
        )
    below = value <= low if low_open else value < low
    if math.isnan(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"The {name!r} parameter of {owner} must be in {bracket}{low}, {high}]. "
            f"Got {value} instead."
        )


@dataclass(frozen=True)
class StudentConfig:
    """Width multiplier of the student; 1.0 keeps the teacher's width."""

    width: float = 1.0

    def __post_init__(self) -> None:
        _check_range("StudentConfig", "width", self.width, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class PruningConfig:
    """Structured pruning: fraction of channels / neurons removed, ranked globally by L2 norm."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_range("PruningConfig", "ratio", self.ratio, 0.0, 0.95)


@dataclass(frozen=True)
class LowRankConfig:
    """SVD factorization keeping ``rank_fraction`` of each layer's full rank; 1.0 is off."""

    rank_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_range("LowRankConfig", "rank_fraction", self.rank_fraction, 0.0, 1.0,
                     low_open=True)


@dataclass(frozen=True)
class DistillationConfig:
    """Recovery fine-tune loss: alpha * T^2 * KL(soft targets at T) + (1 - alpha) * CE."""

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        _check_range("DistillationConfig", "temperature", self.temperature, 0.0, 100.0,
                     low_open=True)
        _check_range("DistillationConfig", "alpha", self.alpha, 0.0, 1.0)


@dataclass(frozen=True)
class QuantizationConfig:
    """Numeric format of the deployed model."""

    scheme: QuantScheme = "fp32"

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(
                f"The 'scheme' parameter of QuantizationConfig must be one of "
                f"{list(QUANT_SCHEMES)}. Got {self.scheme!r} instead."
            )


@dataclass(frozen=True)
class Recipe:
    """Everything applied to the teacher, in the fixed order of the fields below.

    student -> pruning -> low_rank -> (distillation fine-tune) -> quantization.
    """

    student: StudentConfig = field(default_factory=StudentConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of ``to_dict``; missing sections take defaults, unknown keys raise."""
        if not isinstance(data, dict):
            raise TypeError(f"A recipe must be a dict. Got {type(data).__name__} instead.")
        sections = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(
                f"Unknown recipe section(s) {sorted(unknown)}; expected {sorted(sections)}."
            )
        kwargs = {}
        for name, value in data.items():
            config_type = _SECTION_TYPES[name]
            if not isinstance(value, dict):
                raise TypeError(f"Recipe section {name!r} must be a dict. Got {value!r}.")
            known = {f.name for f in fields(config_type)}
            extra = set(value) - known
            if extra:
                raise ValueError(
                    f"Unknown key(s) {sorted(extra)} in recipe section {name!r}; "
                    f"expected {sorted(known)}."
                )
            kwargs[name] = config_type(**value)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def short(self) -> str:
        """A one-line summary for tables and progress lines."""
        parts = []
        if self.student.width != 1.0:
            parts.append(f"width={self.student.width:g}")
        if self.pruning.ratio:
            parts.append(f"prune={self.pruning.ratio:g}")
        if self.low_rank.rank_fraction != 1.0:
            parts.append(f"rank={self.low_rank.rank_fraction:g}")
        parts.append(self.quantization.scheme)
        return " ".join(parts)


_SECTION_TYPES = {
    "student": StudentConfig,
    "pruning": PruningConfig,
    "low_rank": LowRankConfig,
    "distillation": DistillationConfig,
    "quantization": QuantizationConfig,
}

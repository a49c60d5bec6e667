"""The Recipe: one point of the joint compression space, frozen and JSON-serializable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
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


def _check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
        raise ValueError(
            f"The {name!r} parameter of {owner} must be one of {list(choices)}. "
            f"Got {value!r} instead."
        )


def _as_int(config: Any, name: str, low: int, high: int) -> None:
    """Accept an integral number (a sampled float such as 4.0 included) in [low, high]."""
    owner, value = type(config).__name__, getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise TypeError(f"The {name!r} parameter of {owner} must be an integer. "
                        f"Got {value!r} instead.")
    if not low <= value <= high:
        raise ValueError(f"The {name!r} parameter of {owner} must be in [{low}, {high}]. "
                         f"Got {value} instead.")
    object.__setattr__(config, name, int(value))


def _as_bool(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise TypeError(f"The {name!r} parameter of {type(config).__name__} must be true or "
                        f"false. Got {value!r} instead.")


StructuredCriterion = Literal["l2", "l1", "taylor", "bn_scale"]
Allocation = Literal["global", "uniform", "sensitivity"]
SparseCriterion = Literal["magnitude", "taylor", "random"]
SparseScope = Literal["global", "layer"]
SparseSchedule = Literal["one_shot", "gradual"]
ConvFactorization = Literal["svd", "tucker2"]
Granularity = Literal["per_channel", "per_tensor"]
KeepFloat = Literal["none", "first_last", "sensitive"]


@dataclass(frozen=True)
class StudentConfig:
    """Width and depth multipliers of the student; 1.0 keeps the teacher's."""

    width: float = 1.0
    depth: float = 1.0

    def __post_init__(self) -> None:
        _check_range("StudentConfig", "width", self.width, 0.0, 1.0, low_open=True)
        _check_range("StudentConfig", "depth", self.depth, 0.0, 1.0, low_open=True)


@dataclass(frozen=True)
class PruningConfig:
    """Structured pruning: ``heads`` of the attention heads, then ``ratio`` of the
    channels / neurons, physically removed.

    ``criterion`` ranks channels (L2 or L1 weight norm, first-order Taylor, BatchNorm
    scale) and heads (the same, BatchNorm scale as L2); ``allocation`` spreads the ratio:
    one ranking across the network (``global``), the same ratio per layer (``uniform``),
    or per-layer ratios scaled inversely to each layer's measured sensitivity
    (``sensitivity``; heads then go uniformly); channel counts are kept at multiples of
    ``round_to``. Removing heads leaves the residual stream's width alone.
    """

    ratio: float = 0.0
    criterion: StructuredCriterion = "l2"
    allocation: Allocation = "global"
    round_to: int = 1
    heads: float = 0.0

    def __post_init__(self) -> None:
        _check_range("PruningConfig", "ratio", self.ratio, 0.0, 0.95)
        _check_range("PruningConfig", "heads", self.heads, 0.0, 0.95)
        _check_choice("PruningConfig", "criterion", self.criterion,
                      get_args(StructuredCriterion))
        _check_choice("PruningConfig", "allocation", self.allocation, get_args(Allocation))
        _as_int(self, "round_to", 1, 256)


@dataclass(frozen=True)
class SparsityConfig:
    """Unstructured pruning: ``ratio`` of the Linear / Conv weights set to zero.

    Ranked by ``criterion`` (magnitude, first-order Taylor |w * grad|, random) across the
    network or per layer (``scope``), at once before the fine-tune or ``gradual``ly during
    it (polynomial schedule); ``block > 1`` removes square blocks (stored BSR).
    """

    ratio: float = 0.0
    criterion: SparseCriterion = "magnitude"
    scope: SparseScope = "global"
    schedule: SparseSchedule = "one_shot"
    block: int = 1

    def __post_init__(self) -> None:
        _check_range("SparsityConfig", "ratio", self.ratio, 0.0, 0.99)
        _check_choice("SparsityConfig", "criterion", self.criterion, get_args(SparseCriterion))
        _check_choice("SparsityConfig", "scope", self.scope, get_args(SparseScope))
        _check_choice("SparsityConfig", "schedule", self.schedule, get_args(SparseSchedule))
        _as_int(self, "block", 1, 64)


@dataclass(frozen=True)
class LowRankConfig:
    """Factorization of Linear / Conv layers; ``rank_fraction == energy == 1.0`` is off.

    The rank is the smaller of ``rank_fraction`` of the full rank and the fewest singular
    values holding ``energy`` of the squared spectrum. Convolutions use SVD (k x k conv to
    r channels, then 1 x 1) or Tucker-2 (1 x 1, k x k core, 1 x 1).
    """

    rank_fraction: float = 1.0
    energy: float = 1.0
    conv: ConvFactorization = "svd"

    def __post_init__(self) -> None:
        _check_range("LowRankConfig", "rank_fraction", self.rank_fraction, 0.0, 1.0,
                     low_open=True)
        _check_range("LowRankConfig", "energy", self.energy, 0.0, 1.0, low_open=True)
        _check_choice("LowRankConfig", "conv", self.conv, get_args(ConvFactorization))


@dataclass(frozen=True)
class DistillationConfig:
    """Recovery fine-tune loss: alpha * T^2 * KL(soft targets at T) + (1 - alpha) * CE,
    plus ``feature_weight`` * MSE between the teacher's penultimate features and the
    student's through a learned linear projection (0: response distillation only)."""

    temperature: float = 4.0
    alpha: float = 0.9
    feature_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_range("DistillationConfig", "temperature", self.temperature, 0.0, 100.0,
                     low_open=True)
        _check_range("DistillationConfig", "alpha", self.alpha, 0.0, 1.0)
        _check_range("DistillationConfig", "feature_weight", self.feature_weight, 0.0, 100.0)


@dataclass(frozen=True)
class QuantizationConfig:
    """Numeric format of the deployed model.

    ``granularity`` of int8 weights (per output channel or per tensor);
    ``calibration_batches`` for static int8; ``qat`` trains int8_static with fake
    quantization during the fine-tune, then converts; ``keep_float`` leaves layers at
    float precision (none, first and last, or the most sensitive quarter measured on
    calibration data); ``cluster_bits`` k > 0 shares each float layer's weights through a
    k-means codebook of 2^k values, stored as packed k-bit indices.
    """

    scheme: QuantScheme = "fp32"
    granularity: Granularity = "per_channel"
    calibration_batches: int = 8
    qat: bool = False
    keep_float: KeepFloat = "none"
    cluster_bits: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise ValueError(
                f"The 'scheme' parameter of QuantizationConfig must be one of "
                f"{list(QUANT_SCHEMES)}. Got {self.scheme!r} instead."
            )
        _check_choice("QuantizationConfig", "granularity", self.granularity,
                      get_args(Granularity))
        _as_int(self, "calibration_batches", 1, 1024)
        _as_bool(self, "qat")
        _check_choice("QuantizationConfig", "keep_float", self.keep_float, get_args(KeepFloat))
        _as_int(self, "cluster_bits", 0, 8)


@dataclass(frozen=True)
class Recipe:
    """Everything applied to the teacher, in this fixed order:

    student -> pruning -> low_rank -> sparsity -> (distillation fine-tune, with QAT and
    gradual sparsity) -> weight sharing -> quantization -> sparse storage.

    Settings that cannot act under the rest of the recipe take their defaults, so two
    recipes giving the same model compare equal: ``qat`` outside ``int8_static``;
    ``granularity`` outside the int8 schemes; ``calibration_batches`` unless calibrated
    static int8; ``cluster_bits`` under int8 schemes (they store their own 8-bit weights);
    ``keep_float`` when nothing is quantized or clustered; the details of pruning,
    sparsity and low rank when these are off.
    """

    student: StudentConfig = field(default_factory=StudentConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)  # last: positional order

    def __post_init__(self) -> None:
        q = self.quantization
        int8 = q.scheme.startswith("int8")
        qat = q.qat and q.scheme == "int8_static"
        bits = 0 if int8 else q.cluster_bits
        q = replace(
            q, qat=qat, cluster_bits=bits,
            granularity=q.granularity if int8 else "per_channel",
            calibration_batches=(q.calibration_batches
                                 if q.scheme == "int8_static" and not qat else 8),
            keep_float=q.keep_float if q.scheme != "fp32" or bits else "none",
        )
        p = self.pruning
        round_to = p.round_to if self.student.width < 1 else 1
        if p.ratio == 0 and p.heads == 0:
            p = PruningConfig(round_to=round_to)
        elif p.ratio == 0:  # heads only: ranked per module or globally, never by BN scale
            p = PruningConfig(heads=p.heads, round_to=round_to,
                              criterion="l2" if p.criterion == "bn_scale" else p.criterion,
                              allocation="global" if p.allocation == "global" else "uniform")
        s = self.sparsity if self.sparsity.ratio > 0 else SparsityConfig()
        r = self.low_rank
        if r.rank_fraction == 1.0 and r.energy == 1.0:
            r = LowRankConfig()
        object.__setattr__(self, "quantization", q)
        object.__setattr__(self, "pruning", p)
        object.__setattr__(self, "sparsity", s)
        object.__setattr__(self, "low_rank", r)

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
        student, p, s, r = self.student, self.pruning, self.sparsity, self.low_rank
        d, q = self.distillation, self.quantization
        if student.width != 1.0:
            parts.append(f"width={student.width:g}")
        if student.depth != 1.0:
            parts.append(f"depth={student.depth:g}")
        detail = "" if (p.criterion, p.allocation) == ("l2", "global") else (
            f"({p.criterion},{p.allocation})")
        if p.heads:
            parts.append(f"heads={p.heads:g}" + ("" if p.ratio else detail))
        if p.ratio:
            parts.append(f"prune={p.ratio:g}{detail}")
        if s.ratio:
            parts.append(f"sparse={s.ratio:g}({s.criterion},{s.scope},{s.schedule}"
                         + (f",b{s.block}" if s.block > 1 else "") + ")")
        if r.rank_fraction != 1.0:
            parts.append(f"rank={r.rank_fraction:g}")
        if r.energy != 1.0:
            parts.append(f"energy={r.energy:g}")
        if d.feature_weight:
            parts.append(f"feat={d.feature_weight:g}")
        scheme = q.scheme + ("_qat" if q.qat else "")
        if q.granularity == "per_tensor":
            scheme += "/tensor"
        parts.append(scheme)
        if q.cluster_bits:
            parts.append(f"kmeans{q.cluster_bits}b")
        if q.keep_float != "none":
            parts.append(f"keep={q.keep_float}")
        return " ".join(parts)


_SECTION_TYPES = {
    "student": StudentConfig,
    "pruning": PruningConfig,
    "low_rank": LowRankConfig,
    "sparsity": SparsityConfig,
    "distillation": DistillationConfig,
    "quantization": QuantizationConfig,
}

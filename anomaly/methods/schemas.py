"""Schema of detector.json (format anostyle-detector, version 1). The shared pieces (strict
base, finite floats, sha256, `validated`) and the checkpoint metadata are stylegan.schemas'.

detector.json rules beyond types: a known `combine`; 'single' has exactly one component and no
reference, 'rank-average' at least two, each with a sorted, finite reference; the validation
scores are non-empty, finite and sorted (percentiles are read from them by bisection); `tta`
and `method` agree with the components; kappa is finite in [0, 1e6]; the bank is a plain file
name beside detector.json.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from stylegan.schemas import FiniteFloat, Open, Sha256, Strict

Kappa = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
BlockLayer = Annotated[str, Field(pattern=r"^b\d{1,4}(\.[a-z0-9_]{1,40})?$")]
TTA_SUFFIX = "@tta"  # anomaly.methods.detector's (not imported: this module stays free of torch)


def _sorted(values: list[float], what: str) -> list[float]:
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be sorted in increasing order")
    return values


class ComponentRecord(Strict):
    method: Annotated[str, Field(min_length=1, max_length=200)]
    tta: bool
    reference: Annotated[list[FiniteFloat], Field(min_length=1)] | None = None

    @field_validator("reference")
    @classmethod
    def _reference_sorted(cls, values: list[float] | None) -> list[float] | None:
        return None if values is None else _sorted(values, "the reference")


class DetectorRecord(Open):
    """detector.json; fields beyond these (val_auc, tune options ...) are kept as they are."""

    format: Literal["anostyle-detector"]
    version: Literal[1]
    method: str
    combine: Literal["single", "rank-average"]
    tta: bool
    configuration: Annotated[list[ComponentRecord], Field(min_length=1, max_length=16)]
    threshold: FiniteFloat
    threshold_rule: str
    comparison: str
    val_normal_scores: Annotated[list[FiniteFloat], Field(min_length=1)]
    selection: dict[str, Any] = {}
    bank: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,100}\.safetensors$")] | None = None
    bank_sha256: Sha256 | None = None
    network_sha256: Sha256 | None = None
    encoder_sha256: Sha256 | None = None
    preprocessing: dict[str, Any] | None = None
    kappa: Kappa
    feature_layer: BlockLayer

    @field_validator("val_normal_scores")
    @classmethod
    def _scores_sorted(cls, values: list[float]) -> list[float]:
        return _sorted(values, "the validation scores")

    @model_validator(mode="after")
    def _consistent(self) -> "DetectorRecord":
        comps = self.configuration
        if self.combine == "single" and (len(comps) != 1 or comps[0].reference is not None):
            raise ValueError(f"combine 'single' needs exactly one component without a reference "
                             f"(found {len(comps)})")
        if self.combine == "rank-average" and (len(comps) < 2
                                               or any(c.reference is None for c in comps)):
            raise ValueError("combine 'rank-average' needs two or more components, each with its "
                             "reference")
        if self.tta != any(c.tta for c in comps):
            raise ValueError(f"tta {self.tta} disagrees with the components' tta")
        names = [c.method + (TTA_SUFFIX if c.tta else "") for c in comps]
        method = names[0] if self.combine == "single" else \
            "rank-average(" + " + ".join(names) + ")"
        if self.method != method:
            raise ValueError(f"method {self.method[:80]!r} disagrees with the configuration "
                             f"({method[:80]!r})")
        if self.bank_sha256 is not None and self.bank is None:
            raise ValueError("bank_sha256 is given without a bank")
        return self

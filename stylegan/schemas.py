"""Schemas of the files AnoStyle reads back: one pydantic model per file format, strict (no
bool/str coercion), with ranges, finite numbers and known names; `validated` turns the first
violation into one sentence naming the file and the field.

Here: the safetensors metadata shared by network and encoder checkpoints, their bodies
(`anostyle` JSON), and the config dataclasses inside both (a model built from the dataclass's
own fields, so the dataclass stays the one place that lists them). detector.json's lives in
anomaly/methods/schemas.py.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from stylegan.errors import UserError
from stylegan.fileio import UntrustedJSONError, loads_untrusted

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Config bounds: far beyond any network AnoStyle trains (1024 px, 512 channels), small enough
# that a tampered file cannot ask for terabytes before a weight is read.
CONFIG_INT_MAX = 1 << 16
CONFIG_ENUMS = {"architecture": ("orig", "skip", "resnet"), "latent": ("wplus", "w")}


class Strict(BaseModel):
    """A file record: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Open(BaseModel):
    """A record that may carry further fields (kept as they are, unchecked)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


def validated(model: type[BaseModel], body: Any, *, where: str, fix: str) -> Any:
    """`model` validated from `body`; the first violation is one sentence naming `where` (the
    file) and the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ").rstrip(".")
        if not err["loc"]:  # a rule across fields
            raise UserError(f"{where} is inconsistent: {msg}; {fix}.") from None
        field = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        shown = "" if isinstance(given, (dict, list)) else f" (given {str(given)[:60]!r})"
        raise UserError(f"{where} has a bad field {field}: {msg}{shown}; {fix}.") from None


def json_field(text: str, *, where: str, fix: str) -> Any:
    """A JSON value stored as a string (safetensors metadata), within loads_untrusted's limits."""
    try:
        return loads_untrusted(text)
    except UntrustedJSONError as exc:
        raise UserError(f"{where} cannot be read: {exc}; {fix}.") from None


class CheckpointMeta(Open):
    """The safetensors metadata of an AnoStyle checkpoint (strings only, as safetensors keeps)."""

    format: str
    format_version: Annotated[str, Field(pattern=r"^[0-9]{1,4}$")]
    anostyle: str


class NetworkExtra(Open):
    augment_pipe: dict[str, Any] | None = None
    training_set_kwargs: dict[str, Any] | None = None


class NetworkBody(Strict):
    """The `anostyle` JSON of a network checkpoint."""

    configs: dict[Literal["G", "D", "G_ema"], dict[str, Any]]
    extra: NetworkExtra = NetworkExtra()


class EncoderNetwork(Open):
    """The network an encoder was trained against."""

    path: str | None = None
    sha256: Sha256 | None = None


class EncoderExtra(Open):
    network: EncoderNetwork | None = None
    training_options: dict[str, Any] = {}
    preprocessing: dict[str, Any] | None = None

    @field_validator("training_options")
    @classmethod
    def _kappa_is_a_finite_number(cls, options: dict[str, Any]) -> dict[str, Any]:
        kappa = options.get("kappa")  # recorded as text by the CLI ("1.0"), read as izif's kappa
        if kappa not in (None, "None"):
            try:
                value = float(kappa) if not isinstance(kappa, bool) else float("nan")
            except (TypeError, ValueError):
                value = float("nan")
            if not 0 <= value <= 1e6:
                raise ValueError(f"kappa {str(kappa)[:40]!r} must be a number in [0, 1e6]")
        return options


class EncoderBody(Strict):
    """The `anostyle` JSON of an encoder checkpoint (config checked by its own schema)."""

    config: dict[str, Any]
    extra: EncoderExtra = EncoderExtra()


@functools.cache
def config_model(cls: type) -> type[BaseModel]:
    """A strict model of a frozen config dataclass: its fields and defaults, ints in
    [0, CONFIG_INT_MAX], finite floats, JSON lists for tuples, known names for CONFIG_ENUMS."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = _bounded(hints[f.name], f.name)
        default = f.default if f.default is not dataclasses.MISSING else ...
        fields[f.name] = (kind, list(default) if isinstance(default, tuple) else default)
    return create_model(f"{cls.__name__}Record", __base__=Strict, **fields)


def _bounded(kind: Any, name: str) -> Any:
    if name in CONFIG_ENUMS:
        return Literal[CONFIG_ENUMS[name]]
    if kind is int:
        return Annotated[int, Field(ge=0, le=CONFIG_INT_MAX)]
    if kind is float:
        return FiniteFloat
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return Annotated[list[_bounded(args[0], "")], Field(max_length=64)]
    if args and type(None) in args:  # X | None
        return _bounded(next(a for a in args if a is not type(None)), name) | None
    return kind


def config_from_record(cls: type, values: Any, *, where: str, fix: str) -> Any:
    """The config dataclass `cls` from its JSON record, checked by `config_model(cls)`; an
    image resolution must be a power of two of at least 4."""
    record = validated(config_model(cls), values, where=where, fix=fix)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in record.model_dump().items()}
    res = kwargs.get("img_resolution")
    if res is not None and (res < 4 or res & (res - 1)):
        raise UserError(f"{where} has a bad field img_resolution: {res} is not a power of two "
                        f">= 4; {fix}.")
    try:
        return cls(**kwargs)
    except (AssertionError, ValueError, TypeError) as exc:
        raise UserError(f"{where} has an inconsistent {cls.__name__} ({exc}); {fix}.") from None

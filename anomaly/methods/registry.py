"""Every scoring method by name: ONE table of method families and ONE parser.

A method name (case-insensitive) belongs to one family of `FAMILIES`; `parse(name)` returns its
`MethodSpec`: the family, the parameters (bounds checked), what the method needs from a pass
(reconstruction, D features, latents, a bank space) and which system computes it:
    classic   izif, torch-euclidean, latent, sklearn:METRIC — from one forward pass
              (AnoModel.score_forward, anomaly.methods.scores);
    detector  residual:..., lesion:..., izif:KAPPA[:LAYER], izif-areafree:KAPPA[:LAYER],
              dfeat-res:..., knn-latent:K, maha-latent, knn-dfeat:LAYER:K, maha-dfeat:LAYER — from the raw quantities of
              anomaly.methods.detector.extract (formulas in anomaly.methods.detector_scores).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

from anomaly.methods.scores import MAX_KAPPA, SKLEARN_METRICS, check_sklearn_metric
from stylegan.errors import UserError

_NUM = r"(\d+(?:\.\d*)?(?:e-?\d+)?)"

# Bounds of the names' numbers: far beyond any setting that ranks lesions, tight enough that no
# name can ask for gigabytes (residual:smax:1e7 meant a Gaussian of 6e7 taps over padded maps
# of 1e14 pixels). SIGMA: a blur wider than 64 px (half of a 128 px image) flattens any lesion,
# and `detector.needs_of` also holds it to half the model's resolution. K: neighbours among the
# bank's at most `bank_size` points (2000 by default); more than 1000 is a density estimate no
# longer local, and `detector.load_detector` also holds K to the bank's size. kappa: izif
# weighs the feature term 0.1-10 in practice; beyond MAX_KAPPA the pixel term vanishes in
# float32 rounding. Layers: D blocks b8 to b4096, each at most once, at most 8 in one name.
MAX_SIGMA, MAX_K, MAX_LAYERS = 64.0, 1000, 8


@dataclass(frozen=True)
class MethodSpec:
    """One parsed method name: parameters, needs and the system that computes it."""

    name: str  # the name, stripped and lower-case
    family: str  # the name of its Family in FAMILIES
    system: str  # 'classic' | 'detector'
    metric: str = ""  # sklearn: the scikit-learn metric
    agg: str = ""  # the residual aggregation read: mean | p99 | smax | lesion-mean | ...
    sigma: float = 0.0  # residual:smax: the smoothing in pixels (0 for every other method)
    kappa: float | None = None  # izif:KAPPA (None: the classic izif takes the model's kappa)
    layers: tuple[str, ...] = ()  # D layers named by the method (izif: empty = the model's)
    space: str = ""  # the bank space of a density: 'latent' | 'dfeat:bRES'
    k: int = 0  # knn: neighbours
    needs_rec: bool = False  # the reconstruction G(E(x))
    needs_features: bool = False  # D features (of `layers`, else of the model's feature layer)
    needs_latents: bool = False  # the encoded latent E(x)

    @property
    def density(self) -> str:
        """'knn' | 'maha' for a density in a bank space, else ''."""
        return self.family.split("-", 1)[0] if self.space else ""

    @property
    def spread_layers(self) -> tuple[str, ...]:
        """The D layers whose channel spreads the method reads from the bank."""
        return self.layers if self.family == "dfeat-res" else ()

    @property
    def area_free(self) -> bool:
        """True for izif-areafree: the lesion's area and the bank's area trend."""
        return self.family == "izif-areafree"

    @property
    def needs_bank(self) -> bool:
        """True when the method reads the training-naevi bank (a space, channel spreads or an
        area trend)."""
        return bool(self.space or self.spread_layers or self.area_free)


@dataclass(frozen=True)
class Family:
    """One row of the table: names matching `pattern` (whole, lower-case) are this family."""

    name: str
    system: str  # 'classic' | 'detector'
    pattern: str
    params: Callable[[re.Match], dict]  # the MethodSpec fields beyond name, family and system
    form: str  # the name's grammar, as the unknown-name error lists it
    example: str
    description: str


def _count(digits: str) -> int:
    """A whole number of a name; more than 9 digits is read as 10**9 (out of every bound and
    never converted: Python refuses int() of over 4300 digits)."""
    return int(digits) if len(digits) <= 9 else 10**9


def _sklearn(m: re.Match) -> dict:
    return dict(metric=check_sklearn_metric(m[1]), needs_rec=True)


FAMILIES: tuple[Family, ...] = (
    Family("izif", "classic", r"izif",
           lambda m: dict(needs_rec=True, needs_features=True),
           "izif", "izif", "f-AnoGAN izif score: pixel MSE + the model's kappa * D-feature MSE"),
    Family("torch-euclidean", "classic", r"torch-euclidean",
           lambda m: dict(needs_rec=True),
           "torch-euclidean", "torch-euclidean",
           "Euclidean distance between the image and its reconstruction (torch)"),
    Family("latent", "classic", r"latent",
           lambda m: dict(needs_latents=True),
           "latent", "latent", "Euclidean distance of the encoded latent from the average w"),
    Family("sklearn", "classic", r"sklearn:(.*)", _sklearn,
           f"sklearn:{'|'.join(SKLEARN_METRICS)}", "sklearn:cosine",
           "a scikit-learn distance between the image and its reconstruction"),
    Family("residual", "detector", rf"residual:(?:(mean|p99)|(smax)(?::{_NUM})?)",
           lambda m: dict(agg=m[1] or m[2], sigma=float(m[3] or 2.0) if m[2] else 0.0,
                          needs_rec=True),
           "residual:mean|p99|smax[:SIGMA]", "residual:smax:2",
           "mean, 99th percentile or smoothed maximum of the pixel residual map"),
    Family("lesion", "detector", r"lesion:(mean|edge|ratio)",
           lambda m: dict(agg=f"lesion-{m[1]}", needs_rec=True),
           "lesion:mean|edge|ratio", "lesion:edge",
           "the pixel residual over the input's lesion mask, its edge, or inside/outside"),
    Family("izif-kappa", "detector", rf"izif:{_NUM}(?::(b\d+))?",
           lambda m: dict(agg="mean", kappa=float(m[1]), layers=(m[2],) if m[2] else (),
                          needs_rec=True, needs_features=float(m[1]) > 0),
           "izif:KAPPA[:LAYER]", "izif:0.5:b16",
           "izif with this kappa at this D layer (the model's layer when none is named)"),
    Family("izif-areafree", "detector", rf"izif-areafree:{_NUM}(?::(b\d+))?",
           lambda m: dict(agg="mean", kappa=float(m[1]), layers=(m[2],) if m[2] else (),
                          needs_rec=True, needs_features=float(m[1]) > 0),
           "izif-areafree:KAPPA[:LAYER]", "izif-areafree:1",
           "log izif:KAPPA minus its trend on the lesion's area among the bank's training naevi"),
    Family("dfeat-res", "detector", r"dfeat-res:(b\d+(?:\+b\d+)*)",
           lambda m: dict(layers=tuple(m[1].split("+")), needs_rec=True, needs_features=True),
           "dfeat-res:b8+b16", "dfeat-res:b8+b16",
           "D-feature residual normalised by the training naevi's channel spreads"),
    Family("knn-latent", "detector", r"knn-latent:(\d+)",
           lambda m: dict(space="latent", k=_count(m[1]), needs_latents=True),
           "knn-latent:K", "knn-latent:5",
           "mean distance of E(x) (mean over its ws) to its K nearest training naevi in the bank"),
    Family("maha-latent", "detector", r"maha-latent",
           lambda m: dict(space="latent", needs_latents=True),
           "maha-latent", "maha-latent",
           "Mahalanobis distance of E(x) (mean over its ws) in the bank's PCA space"),
    Family("knn-dfeat", "detector", r"knn-dfeat:(b\d+):(\d+)",
           lambda m: dict(space=f"dfeat:{m[1]}", layers=(m[1],), k=_count(m[2]),
                          needs_features=True),
           "knn-dfeat:LAYER:K", "knn-dfeat:b16:5",
           "mean distance of pooled D features to their K nearest training naevi in the bank"),
    Family("maha-dfeat", "detector", r"maha-dfeat:(b\d+)",
           lambda m: dict(space=f"dfeat:{m[1]}", layers=(m[1],), needs_features=True),
           "maha-dfeat:LAYER", "maha-dfeat:b16",
           "Mahalanobis distance of pooled D features in the bank's PCA space"),
)


def _known_forms() -> str:
    return ", ".join(f.form if f.form == f.example else f"{f.form} (like {f.example})"
                     for f in FAMILIES)


def _check_bounds(spec: MethodSpec) -> MethodSpec:
    """`spec` when its numbers lie within the bounds above; one sentence otherwise."""
    problem = ""
    if spec.agg == "smax" and not 0 < spec.sigma <= MAX_SIGMA:
        problem = f"SIGMA {spec.sigma:g} must lie in (0, {MAX_SIGMA:g}] pixels"
    elif spec.density == "knn" and not 1 <= spec.k <= MAX_K:
        problem = f"K {spec.k} must lie in [1, {MAX_K}] neighbours"
    elif spec.kappa is not None and not 0 <= spec.kappa <= MAX_KAPPA:
        problem = f"kappa {spec.kappa:g} must lie in [0, {MAX_KAPPA:g}]"
    elif len(spec.layers) > MAX_LAYERS or len(set(spec.layers)) != len(spec.layers):
        problem = f"it names {len(spec.layers)} layers; give at most {MAX_LAYERS}, each once"
    else:
        sizes = {lay: _count(lay[1:]) for lay in spec.layers}
        bad = [lay for lay, r in sizes.items() if not (8 <= r <= 4096 and r & (r - 1) == 0)]
        if bad:
            problem = f"the layer {bad[0][:12]} is not a D block b8 to b4096 (a power of two)"
    if problem:
        raise UserError(f"The scoring method '{spec.name[:80]}' is out of bounds: {problem}.")
    return spec


@functools.lru_cache(maxsize=512)
def parse(name: str, *, where: str = "") -> MethodSpec:
    """THE parser of method names: the spec of `name`; a name of no family or out of bounds
    ends in one sentence (`where`, e.g. '--methods', names the option that gave it)."""
    text = name.strip().lower()
    for family in FAMILIES:
        match = re.fullmatch(family.pattern, text, flags=re.DOTALL)
        if match:
            return _check_bounds(MethodSpec(text, family.name, family.system,
                                            **family.params(match)))
    origin = f" in {where}" if where else ""
    raise UserError(f"Unknown scoring method '{name.strip()[:80]}'{origin}; use one of: "
                    f"{_known_forms()}.")


def parse_list(text: str, *, where: str = "--methods") -> list[MethodSpec]:
    """The specs of a comma-separated list such as "izif,sklearn:cosine,knn-latent:5":
    case-insensitive, duplicates dropped, order kept; an empty list is refused."""
    names = dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"{where} is empty; give at least one method, e.g. {where} izif.")
    return [parse(n, where=where) for n in names]

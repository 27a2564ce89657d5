"""The tuned detector: scoring configurations by name, their raw quantities from one forward
pass (per TTA view), the training-naevi bank, `detector.json`, and scoring one image for serve.

Method names are parsed by anomaly.methods.registry (the detector's system: residual:...,
lesion:..., izif:KAPPA[:LAYER], izif-areafree:KAPPA[:LAYER], dfeat-res:..., knn-latent:K,
maha-latent, knn-dfeat:LAYER:K, maha-dfeat:LAYER; anomaly/methods/detector_scores.py has the
formulas); a pass here also
computes the classic methods (izif, sklearn:..., latent) through the model.
A configuration is a method and a TTA flag; its name is the method, + '@tta' with TTA.
A detector is one configuration, or the rank average of several ("rank-average").

The bank (bank.safetensors): for each learned space a configuration uses, the training naevi's
standardisation, PCA (`dims` axes) and a seeded subset of at most `bank_size` projected points
in float16; per D layer of dfeat-res, the channel spreads; per izif-areafree method, the
slope of log izif on log lesion area over the bank's naevi and their median log area (two
numbers; building it costs one E, G and D pass over the bank's images). Only what the detector
needs is stored (about 0.3 MB per space at d = 64, M = 2000).

Shape letters: N images, C channels, H/W height/width, K style vectors, D w_dim.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from anodata.policy import Preprocessing
from anomaly.methods import detector_scores as ds
from anomaly.methods import registry
from anomaly.methods.scores import Forward, izif_combine
from stylegan.errors import UserError
from stylegan.fileio import read_user_json
from stylegan.imageutil import from_uint8

FORMAT, VERSION = "anostyle-detector", 1
TTA_SUFFIX = "@tta"
DETECTOR_SHEET = "detector"  # detector.xlsx
MODEL_FILES = ("network.safetensors", "encoder.safetensors", "detector.json")
# An anomaly.model.ano_model.AnoModel: that module opens a model folder with its detector through
# this one, so this one does not import it (imports run one way).
AnoModel = Any


# ------------------------------------------------------------------------------ names


def config_name(method: str, tta: bool) -> str:
    return method + (TTA_SUFFIX if tta else "")


def split_config_name(name: str) -> tuple[str, bool]:
    """'knn-latent:5@tta' -> ('knn-latent:5', True)."""
    return (name[: -len(TTA_SUFFIX)], True) if name.endswith(TTA_SUFFIX) else (name, False)


# ------------------------------------------------------------------------------ needs


@dataclass
class Needs:
    """What one pass must compute for a set of methods."""

    latent: bool = False  # E(x) pooled over the ws
    rec: bool = False  # G(E(x)) and the residual map
    aggs: set = field(default_factory=set)  # {('mean', 0.0), ('smax', 2.0), ...}
    res_layers: set = field(default_factory=set)  # D channel residuals (x vs G(E(x)))
    pool_layers: set = field(default_factory=set)  # D features of x pooled over positions
    classic: list = field(default_factory=list)  # classic method names (anomaly.methods.scores)
    classic_b4: bool = False  # a classic method needs features at the model's b4.* layer
    area_methods: set = field(default_factory=set)  # izif-areafree names: lesion areas, trends

    @property
    def d_layers(self) -> set:
        return self.res_layers | self.pool_layers

    @property
    def spaces(self) -> set:
        return ({"latent"} if self.latent else set()) | {f"dfeat:{lay}" for lay in self.pool_layers}


def needs_of(methods: Iterable[str], model: AnoModel) -> Needs:
    """The union of what `methods` (detector or classic names) need."""
    needs = Needs()
    for name in methods:
        spec = registry.parse(name)
        if spec.system == "classic":  # one forward pass through the model
            needs.classic.append(spec.name)
            needs.rec = True
            if spec.needs_features and model.kappa > 0:
                if model.feature_layer.startswith("b4."):  # mixes the batch: D on its own
                    needs.classic_b4 = True
                else:
                    needs.res_layers.add(model.feature_layer)
            continue
        if spec.agg:
            needs.aggs.add((spec.agg, spec.sigma))
        if spec.family in ("izif-kappa", "izif-areafree", "dfeat-res") and spec.needs_features:
            needs.res_layers.update(spec.layers or (model.feature_layer,))
        if spec.area_free:
            needs.area_methods.add(spec.name)
        if spec.space == "latent":
            needs.latent = True
        elif spec.space:
            needs.pool_layers.update(spec.layers)
        needs.rec |= spec.needs_rec
    for layer in needs.d_layers:
        _check_block_layer(model, layer)
    for agg, sigma in needs.aggs:
        if agg == "smax" and sigma > model.resolution / 2:
            raise UserError(f"residual:smax:{sigma:g} smooths wider than half of the model's "
                            f"{model.resolution} px images; give SIGMA <= "
                            f"{model.resolution / 2:g}.")
    return needs


def _check_block_layer(model: AnoModel, layer: str) -> None:
    if model.D is None:
        raise UserError(f"{model.network} holds no discriminator, which D-feature methods need; "
                        f"give a full training snapshot.")
    names = [f"b{r}" for r in model.D.block_resolutions]
    if layer not in names:
        raise UserError(f"The D layer {layer!r} is not a block of this discriminator; choose "
                        f"one of {', '.join(names)} (the b4.* layers mix the batch).")


# ------------------------------------------------------------------------------ one pass


def feature_maps(D: torch.nn.Module, x: torch.Tensor, layers: set) -> dict[str, torch.Tensor]:
    """D block outputs at `layers` ('b{res}') from one pass through the blocks: {layer: [N, c,
    h, w]} (each image's features are its own: no minibatch-stddev before b8's output)."""
    out, h, img = {}, None, x
    for res in D.block_resolutions:
        if not layers - set(out):
            break
        h, img = getattr(D, f"b{res}")(h, img)
        if f"b{res}" in layers:
            out[f"b{res}"] = h.float()
    return out


@torch.no_grad()
def extract(model: AnoModel, images_u8: torch.Tensor, needs: Needs, *, tta: bool
            ) -> dict[str, dict[str, torch.Tensor]]:
    """Raw quantities of a fitted uint8 batch [N, C, H, W] from ONE pass (over the 8 views
    with `tta`): {'plain': {...}, 'tta': {...}}; 'plain' is view 0 (the image as it is).

    Keys: 'latent' [N, D], 'res:<agg>:<sigma>' [N], 'cres:<layer>' [N, c],
    'pool:<layer>' [N, c], 'area' [N] (the input's lesion area share, for izif-areafree) and
    'classic:<method>' [N] for classic methods."""
    x = from_uint8(images_u8.to(model.device))  # [N, C, H, W]
    n, views = len(x), ds.N_VIEWS if tta else 1
    xv = ds.dihedral_views(x) if tta else x  # [V * N, C, H, W] view-major
    q: dict[str, torch.Tensor] = {}
    ws = rec = None
    if needs.latent or needs.rec:
        ws = model.encode(xv)  # [V * N, K, D]
        q["latent"] = ws.float().mean(dim=1)
    if needs.rec:
        rec = model.G.synthesis(ws, noise_mode="const")
        rmap = ds.residual_map(xv, rec)  # [V * N, H, W]
        masks = None
        if needs.area_methods or any(agg.startswith("lesion-") for agg, _s in needs.aggs):
            masks = lesion_masks(images_u8)  # the input's lesion, turned with each view
            masks = (ds.dihedral_views(masks[:, None])[:, 0] if tta else masks).to(rmap.device)
        if needs.area_methods:
            q["area"] = ds.lesion_area(masks)
        for agg, sigma in needs.aggs:
            if agg.startswith("lesion-"):
                q[f"res:{agg}:0"] = ds.lesion_residual(rmap, masks, agg[7:])
            else:
                q[f"res:{agg}:{sigma:g}"] = ds.aggregate_residual(rmap, agg, sigma)
    maps_x = maps_rec = {}
    if needs.d_layers:
        maps_x = feature_maps(model.D, xv, needs.d_layers)
    if needs.res_layers:
        maps_rec = feature_maps(model.D, rec, needs.res_layers)
        for layer in needs.res_layers:
            q[f"cres:{layer}"] = ds.channel_residual(maps_x[layer], maps_rec[layer])
    for layer in needs.pool_layers:
        q[f"pool:{layer}"] = ds.pooled_features(maps_x[layer])
    layer = model.feature_layer
    feats = maps_x.get(layer), maps_rec.get(layer)  # [V * N, ...] each, or None
    if needs.classic:
        if needs.classic_b4:
            feats = model.features(xv), model.features(rec)
        out = Forward(xv, ws, rec, *feats)
        for name, value in model.score_forward(out, needs.classic).items():
            q[f"classic:{name}"] = torch.as_tensor(value, dtype=torch.float64)
    q = {k: v.detach().cpu() for k, v in q.items()}
    result: dict[str, Any] = {"plain": {k: v[:n] for k, v in q.items()}}
    if rec is not None:  # view 0 as the heatmaps and izif's terms need it
        f, fr = feats
        result["forward"] = Forward(xv[:n], ws[:n], rec[:n], None if f is None else f[:n],
                                    None if fr is None else fr[:n])
    if tta:
        result["tta"] = {k: ds.view_mean(v, views) for k, v in q.items()}
    return result


def lesion_masks(images_u8: torch.Tensor) -> torch.Tensor:
    """Lesion masks (anodata.lesion.lesion_mask, all False when none is found) of a fitted
    uint8 batch [N, C, H, W]: bool [N, H, W]."""
    from anodata.lesion import lesion_mask

    arrays = images_u8.cpu().numpy()
    return torch.from_numpy(np.stack([lesion_mask(a.transpose(1, 2, 0) if a.shape[0] == 3
                                                  else a[0]) for a in arrays]))


# ------------------------------------------------------------------------------ the bank


@dataclass
class Bank:
    """Training-naevi references: learned spaces {(space, mode): Space}, D channel
    spreads {layer: [c]} and area trends {(izif-areafree method, mode): AreaTrend}; mode is
    'plain' or 'tta'."""

    spaces: dict = field(default_factory=dict)
    spreads: dict = field(default_factory=dict)
    trends: dict = field(default_factory=dict)

    def update(self, other: "Bank") -> None:
        """Adds (or replaces) every reference of `other`."""
        self.spaces.update(other.spaces)
        self.spreads.update(other.spreads)
        self.trends.update(other.trends)

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        tensors = {}
        for (space, mode), sp in self.spaces.items():
            for key in ("mean", "sd", "components", "eigenvalues"):
                tensors[f"{space}/{mode}/{key}"] = getattr(sp, key).float().contiguous()
            tensors[f"{space}/{mode}/bank"] = sp.bank.half().contiguous()
        for layer, sd in self.spreads.items():
            tensors[f"spread/{layer}"] = sd.float().contiguous()
        for (method, mode), trend in self.trends.items():
            tensors[f"areatrend/{method}/{mode}"] = torch.tensor(
                [trend.slope, trend.median_log_area], dtype=torch.float64)
        from stylegan.fileio import atomic_write_bytes

        atomic_write_bytes(path, save(tensors, metadata={"format": "anostyle-bank",
                                                         "version": "1"}))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, sha256: str | None = None,
             detector: str | os.PathLike = "detector.json") -> "Bank":
        """The bank file at `path`; with `sha256` (what `detector` records), a file with other
        bytes is refused (the bytes hashed are the bytes read)."""
        import hashlib

        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        try:
            data = Path(path).read_bytes()
            if sha256 and hashlib.sha256(data).hexdigest() != sha256:
                raise UserError(f"--detector {detector} was tuned with another bank than the "
                                f"{Path(path).name} beside it (sha256 differs); copy the bank "
                                f"tune wrote with this detector.json, or tune again.")
            tensors = load_bytes(data)
        except (OSError, SafetensorError) as exc:
            raise UserError(f"The bank {path} cannot be read ({exc}); run `anostyle tune` "
                            f"again.") from None
        bank = cls()
        parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("spread/"):
                bank.spreads[key.split("/", 1)[1]] = value.float()
            elif key.startswith("areatrend/"):
                method, mode = key.split("/", 1)[1].rsplit("/", 1)
                slope, median = value.double().tolist()
                bank.trends[(method, mode)] = ds.AreaTrend(slope, median)
            else:
                space, mode, what = key.rsplit("/", 2)
                parts.setdefault((space, mode), {})[what] = value
        for key, p in parts.items():
            bank.spaces[key] = ds.Space(p["mean"], p["sd"], p["components"], p["eigenvalues"],
                                        p["bank"].float())
        return bank

    def subset(self, methods: Sequence[tuple[str, bool]]) -> "Bank":
        """Only what the (method, tta) configurations use."""
        out = Bank()
        for name, tta in methods:
            spec = registry.parse(name)
            if spec.space:
                key = (spec.space, "tta" if tta else "plain")
                out.spaces[key] = self.spaces[key]
            out.spreads.update({lay: self.spreads[lay] for lay in spec.spread_layers})
            if spec.area_free:
                key = (spec.name, "tta" if tta else "plain")
                out.trends[key] = self.trends[key]
        return out


def bank_needs(needs: Needs) -> Needs:
    """What a pass over TRAINING naevi must compute for a bank: embeddings and D features of x;
    for area trends also the reconstruction, izif's terms and the lesion areas."""
    layers = set(needs.pool_layers) | set(needs.res_layers)
    if not needs.area_methods:
        return Needs(latent=needs.latent, pool_layers=layers)
    return Needs(latent=needs.latent, pool_layers=layers, rec=True, aggs={("mean", 0.0)},
                 res_layers=set(needs.res_layers), area_methods=set(needs.area_methods))


@torch.no_grad()
def build_bank(model: AnoModel, batches: Iterable[torch.Tensor], needs: Needs, *,
               modes: Sequence[str], dims: int = 64, bank_size: int = 2000, seed: int = 0
               ) -> Bank:
    """Fit the bank on fitted uint8 training batches: spaces for `needs.spaces` in each mode
    ('plain', 'tta') and channel spreads for `needs.res_layers` (plain view: features of all
    images and positions) and area trends for `needs.area_methods` in each mode."""
    passes = bank_needs(needs)
    emb: dict[tuple[str, str], list[torch.Tensor]] = {}
    moments: dict[str, list] = {}
    areas: dict[tuple[str, str], list[np.ndarray]] = {}  # (method | 'area', mode) -> [N] each
    for images in batches:
        q = extract(model, images, passes, tta="tta" in modes)
        for mode in modes:
            if passes.area_methods:
                areas.setdefault(("area", mode), []).append(q[mode]["area"].numpy())
            for name in sorted(passes.area_methods):
                areas.setdefault((name, mode), []).append(
                    izif_value(registry.parse(name), q[mode], model.feature_layer))
            if passes.latent:
                emb.setdefault(("latent", mode), []).append(q[mode]["latent"])
            for layer in needs.pool_layers:
                emb.setdefault((f"dfeat:{layer}", mode), []).append(q[mode][f"pool:{layer}"])
        if needs.res_layers:
            maps = feature_maps(model.D, from_uint8(images.to(model.device)), needs.res_layers)
            for layer, f in maps.items():
                f = f.double().cpu()
                acc = moments.setdefault(layer, [0.0, 0.0, 0])
                acc[0] = acc[0] + f.sum(dim=(0, 2, 3))
                acc[1] = acc[1] + f.square().sum(dim=(0, 2, 3))
                acc[2] += f.shape[0] * f.shape[2] * f.shape[3]
    bank = Bank()
    for key, parts in emb.items():
        bank.spaces[key] = ds.fit_space(torch.cat(parts), dims=dims, bank_size=bank_size,
                                        seed=seed)
    for layer, (s1, s2, count) in moments.items():
        var = (s2 / count - (s1 / count) ** 2).clamp_min(0)
        bank.spreads[layer] = var.sqrt().float()
    for name in sorted(passes.area_methods):
        for mode in modes:
            try:
                trend = ds.fit_area_trend(np.concatenate(areas[(name, mode)]),
                                          np.concatenate(areas[("area", mode)]))
            except UserError as error:  # one method of a grid must not end the whole tune
                warnings.warn(f"{error} {name} is scored without a size trend (slope 0: it "
                              f"ranks as {name.replace('-areafree', '')}).", UserWarning,
                              stacklevel=2)
                trend = ds.AreaTrend(0.0, 0.0)
            bank.trends[(name, mode)] = trend
    return bank


def bank_from_zip(model: AnoModel, train: str | os.PathLike, needs: Needs, *,
                  modes: Sequence[str], bank_size: int = 2000, dims: int = 64, seed: int = 0,
                  batch: int = 64) -> Bank:
    """The bank of a seeded subset of at most `bank_size` images of train.zip (an empty bank
    when `needs` uses none)."""
    from stylegan.dataset import ImageDataset
    from stylegan.progress import progress

    if not (needs.spaces or needs.res_layers or needs.area_methods):
        return Bank()
    dataset = ImageDataset(train)
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:bank_size])

    def batches():
        for start in progress(range(0, len(pick), batch), desc="bank"):
            yield torch.from_numpy(np.stack([dataset[int(i)][0]
                                             for i in pick[start:start + batch]]))

    return build_bank(model, batches(), needs, modes=modes, dims=dims, bank_size=bank_size,
                      seed=seed)


# ------------------------------------------------------------------------------ scores


def izif_value(m: registry.MethodSpec, q: dict[str, torch.Tensor], model_layer: str
               ) -> np.ndarray:
    """izif:KAPPA[:LAYER] (the kappa and layer of spec m) from the raw quantities q: [N]."""
    value = q[f"res:{m.agg}:0"].double()  # A_R (residual_map's mean)
    if m.kappa > 0:  # A_D: the channel residuals' mean over channels
        value = izif_combine(value, q[f"cres:{(m.layers or (model_layer,))[0]}"].double()
                             .mean(dim=1), m.kappa)
    return value.numpy()


def method_scores(name: str, q: dict[str, torch.Tensor], *, mode: str, bank: Bank | None,
                  model_layer: str) -> np.ndarray:
    """Scores [N] of one method from the raw quantities `q` of one mode ('plain' | 'tta')."""
    m = registry.parse(name)
    if m.system == "classic":
        return q[f"classic:{m.name}"].double().numpy()
    if m.family in ("residual", "lesion"):
        return q[f"res:{m.agg}:{m.sigma:g}"].double().numpy()
    if m.family == "izif-kappa":
        return izif_value(m, q, model_layer)
    if bank is None:
        raise UserError(f"The method {name} needs the training-naevi bank; score with "
                        f"--detector/--model (bank.safetensors) or give --train train.zip.")
    if m.area_free:
        trend = bank.trends.get((m.name, mode))
        if trend is None:
            raise UserError(f"The bank holds no area trend for {name} ({mode}); score with the "
                            f"bank tune wrote for it, or give --train train.zip.")
        return ds.area_free(izif_value(m, q, model_layer), q["area"].numpy(), trend)
    if m.family == "dfeat-res":
        return ds.normalised_feature_residual([q[f"cres:{lay}"] for lay in m.layers],
                                              [bank.spreads[lay] for lay in m.layers]).numpy()
    space = bank.spaces[(m.space, mode)]
    emb = q["latent"] if m.space == "latent" else q[f"pool:{m.layers[0]}"]
    projected = space.project(emb)
    if m.density == "knn":
        if m.k > space.bank.shape[0]:
            raise UserError(f"{name}: k = {m.k} exceeds the {space.bank.shape[0]} bank points.")
        return ds.knn_distance(projected, space.bank, m.k).numpy()
    return ds.mahalanobis(projected, space.eigenvalues).numpy()


# ------------------------------------------------------------------------------ detector.json


@dataclass(frozen=True)
class Component:
    """One configuration of a detector; `reference` = its sorted validation-normal scores."""

    method: str
    tta: bool
    reference: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return config_name(self.method, self.tta)


@dataclass(frozen=True)
class Detector:
    """A tuned detector as recorded in detector.json (format anostyle-detector, version 1)."""

    components: tuple[Component, ...]
    combine: str  # 'single' | 'rank-average'
    threshold: float
    threshold_rule: str
    comparison: str
    val_normals: tuple[float, ...]  # the detector's scores of the validation normals, sorted
    selection: dict
    bank: str | None  # bank file name beside detector.json (None: no bank needed)
    network_sha256: str | None
    encoder_sha256: str | None
    preprocessing: dict | None
    kappa: float
    feature_layer: str
    extra: dict = field(default_factory=dict)  # val AUC, CI, tune options ...
    bank_sha256: str | None = None  # sha256 of the bank file (load_detector refuses another)

    @property
    def method(self) -> str:
        if self.combine == "single":
            return self.components[0].name
        return "rank-average(" + " + ".join(c.name for c in self.components) + ")"

    @property
    def tta(self) -> bool:
        return any(c.tta for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "method": self.method,
                "combine": self.combine, "tta": self.tta,
                "configuration": [{"method": c.method, "tta": c.tta,
                                   **({"reference": list(c.reference)} if c.reference else {})}
                                  for c in self.components],
                "threshold": self.threshold, "threshold_rule": self.threshold_rule,
                "comparison": self.comparison, "val_normal_scores": list(self.val_normals),
                "selection": self.selection, "bank": self.bank,
                **({"bank_sha256": self.bank_sha256} if self.bank_sha256 else {}),
                "network_sha256": self.network_sha256, "encoder_sha256": self.encoder_sha256,
                "preprocessing": self.preprocessing, "kappa": self.kappa,
                "feature_layer": self.feature_layer, **self.extra}

    def save(self, path: str | os.PathLike) -> Path:
        from stylegan.fileio import atomic_write_json

        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Detector":
        """detector.json checked by its schema (anomaly.methods.schemas.DetectorRecord) and its
        method names by anomaly.methods.registry; anything else ends in one sentence naming the field."""
        from anomaly.methods.schemas import DetectorRecord
        from stylegan.schemas import validated

        path = Path(path)
        fix = "give the detector.json that `anostyle tune` wrote"
        body = read_user_json(path, flag="--detector", fix=fix)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise UserError(f"--detector {path} is not an {FORMAT} file; {fix}.")
        if body.get("version") != VERSION:
            raise UserError(f"--detector {path} has version {body.get('version')!r}; this "
                            f"AnoStyle reads version {VERSION}.")
        rec = validated(DetectorRecord, body, where=f"--detector {path}", fix=fix)
        for i, c in enumerate(rec.configuration):
            try:
                registry.parse(c.method)
            except UserError as exc:
                why = str(exc).rstrip(".")
                raise UserError(f"--detector {path} has a bad field configuration.{i}.method: "
                                f"{why[:1].lower()}{why[1:]}.") from None
        comps = tuple(Component(c.method, c.tta, tuple(c.reference or ()))
                      for c in rec.configuration)
        return cls(comps, rec.combine, rec.threshold, rec.threshold_rule, rec.comparison,
                   tuple(rec.val_normal_scores), dict(rec.selection), rec.bank,
                   rec.network_sha256, rec.encoder_sha256, rec.preprocessing, rec.kappa,
                   rec.feature_layer, dict(rec.model_extra or {}), bank_sha256=rec.bank_sha256)


# ------------------------------------------------------------------------------ scoring


class Scorer:
    """Scores batches with a list of (method, tta) configurations from one pass per batch."""

    def __init__(self, model: AnoModel, configs: Sequence[tuple[str, bool]], *,
                 bank: Bank | None = None):
        self.model, self.configs, self.bank = model, list(dict.fromkeys(configs)), bank
        self.tta = any(t for _m, t in self.configs)
        self.needs = needs_of([m for m, _t in self.configs], model)
        self.last_forward: Forward | None = None  # view 0 of the last batch (heatmaps, terms)

    def score_batch(self, images_u8: torch.Tensor) -> dict[str, np.ndarray]:
        """{configuration name: float64 [N]} for a fitted uint8 batch."""
        q = extract(self.model, images_u8, self.needs, tta=self.tta)
        self.last_forward = q.pop("forward", None)
        return {config_name(m, t): method_scores(m, q["tta" if t else "plain"],
                                                 mode="tta" if t else "plain", bank=self.bank,
                                                 model_layer=self.model.feature_layer)
                for m, t in self.configs}


@dataclass(frozen=True)
class Judgement:
    """A detector's answer for one image."""

    score: float
    percentile: float | None  # share (%) of validation normals scoring <= this score; None:
    # the detector records no validation normals (serve's izif mode without izif.xlsx)
    decision: str  # 'anomalous' (score >= threshold) | 'normal'
    threshold: float
    threshold_rule: str
    method: str


class DetectorScorer:
    """A loaded detector on its model (AnoModel.detector): `score_batch` gives its scores;
    AnoModel.judge answers for one image."""

    def __init__(self, model: AnoModel, detector: Detector, bank: Bank | None):
        self.model, self.detector, self.bank = model, detector, bank
        self.configs = [(c.method, c.tta) for c in detector.components]
        self.scorer = Scorer(model, self.configs, bank=bank)

    def combine(self, per_config: dict[str, np.ndarray]) -> np.ndarray:
        """The detector's scores [N] from its components' scores {configuration name: [N]}.
        An image with any non-finite component score gets NaN (a rank average would turn +inf
        into a finite percentile of 100): a detector that cannot score never says 'normal'."""
        comps = self.detector.components
        parts = [np.asarray(per_config[c.name], dtype=np.float64) for c in comps]
        if self.detector.combine == "single":
            out = parts[0].copy()
        else:
            out = ds.rank_average(parts, [np.asarray(c.reference) for c in comps])
        out[~np.all([np.isfinite(p) for p in parts], axis=0)] = np.nan
        return out

    def score_batch(self, images_u8: torch.Tensor) -> np.ndarray:
        """The detector's scores [N] of a fitted uint8 batch [N, C, H, W]."""
        return self.combine(self.scorer.score_batch(images_u8))


def _bank_keys(methods: Iterable[str], tta: bool) -> tuple[set, set, set]:
    """(spaces {(space, mode)}, spread layers, area trends {(method, mode)}) that `methods`
    read from a bank."""
    spaces, layers, trends = set(), set(), set()
    mode = "tta" if tta else "plain"
    for name in methods:
        spec = registry.parse(name)
        if spec.space:
            spaces.add((spec.space, mode))
        layers.update(spec.spread_layers)
        if spec.area_free:
            trends.add((spec.name, mode))
    return spaces, layers, trends


def sheet_scorer(model: AnoModel, methods: Sequence[str], *, tta: bool,
                 detector: "DetectorScorer | None", train: str | None) -> Scorer:
    """One Scorer for the requested methods (all with or all without TTA) and the detector's
    components; the bank is the detector's, completed from `train` (train.zip) when a
    requested method needs a space or spread the detector's bank lacks."""
    bank = Bank()
    if detector is not None and detector.bank is not None:
        bank.update(detector.bank)
    spaces, layers, trends = _bank_keys(methods, tta)
    detector_methods = [m for m in methods if registry.parse(m).system == "detector"]
    if not (spaces <= set(bank.spaces) and layers <= set(bank.spreads)
            and trends <= set(bank.trends)):
        if train is None:
            wanted = sorted({s for s, _m in spaces - set(bank.spaces)} | layers
                            | {f"area trend of {m}" for m, _mode in trends - set(bank.trends)})
            raise UserError(f"The methods {', '.join(detector_methods)} need the training-naevi "
                            f"bank ({', '.join(wanted)}); give --train train.zip (or use the "
                            f"methods of --detector).")
        needs = needs_of(detector_methods, model)
        bank.update(bank_from_zip(model, train, needs, modes=("tta" if tta else "plain",)))
    configs = [(m, tta) for m in methods] + (detector.configs if detector else [])
    return Scorer(model, configs, bank=bank)


def load_detector(model: AnoModel, path: str | os.PathLike) -> DetectorScorer:
    """detector.json (+ its bank beside it) on a loaded model; refuses a detector tuned for
    other networks or another preprocessing policy, in one sentence."""
    det = Detector.load(path)
    for what, recorded, file, actual in (
            ("network", det.network_sha256, model.network, model.network_sha256),
            ("encoder", det.encoder_sha256, model.encoder, model.encoder_sha256)):
        if recorded and file and actual != recorded:
            raise UserError(f"--detector {path} was tuned for another {what} than {file} "
                            f"(sha256 differs); tune again for this model.")
    policy = model.recorded_policy
    tuned = det.preprocessing and Preprocessing.from_dict(det.preprocessing, source=str(path))
    if tuned and policy is not None and tuned != policy:
        raise UserError(f"--detector {path} was tuned on data with another preprocessing "
                        f"policy than the model records; tune again for this model.")
    bank = None
    if det.bank:
        bank_path = Path(path).parent / det.bank
        if not bank_path.is_file():
            raise UserError(f"--detector {path} names the bank {det.bank}, which is not beside "
                            f"it; copy bank.safetensors along with detector.json.")
        bank = Bank.load(bank_path, sha256=det.bank_sha256, detector=path)
        for c in det.components:
            spaces, layers, trends = _bank_keys([c.method], c.tta)
            lacking = sorted(f"{s} ({m})" for s, m in spaces - set(bank.spaces)) \
                + sorted(f"spread {lay}" for lay in layers - set(bank.spreads)) \
                + sorted(f"area trend ({m})" for _n, m in trends - set(bank.trends))
            if lacking:
                raise UserError(f"--detector {path}: its bank {det.bank} holds no "
                                f"{', '.join(lacking)} for {c.name}; copy the bank tune wrote "
                                f"with this detector.json, or tune again.")
            m = registry.parse(c.method)
            space = m.density == "knn" and bank.spaces.get((m.space, "tta" if c.tta
                                                             else "plain"))
            if space and m.k > space.bank.shape[0]:
                raise UserError(f"--detector {path} asks {c.method} for more neighbours than "
                                f"its bank holds ({space.bank.shape[0]} points); tune again.")
    return DetectorScorer(model, det, bank)


def resolve_model_dir(folder: str | os.PathLike | None, network: str | None,
                      encoder: str | None) -> tuple[str, str, str | None]:
    """(network, encoder, detector.json or None) from --model DIR and/or --network/--encoder
    (an explicit file wins over the folder's)."""
    if folder is None:
        if not network or not encoder:
            missing = "--network" if not network else "--encoder"
            raise UserError(f"{missing} is missing; give --network and --encoder, or --model DIR "
                            f"(a folder with network.safetensors and encoder.safetensors).")
        return network, encoder, None
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder; give a model folder such as "
                        f"models/ham64-cpu.")
    files = {name: folder / name for name in MODEL_FILES}
    for name in MODEL_FILES[:2]:
        if not files[name].is_file() and not (network if "network" in name else encoder):
            raise UserError(f"--model {folder} holds no {name}; a model folder needs "
                            f"network.safetensors and encoder.safetensors.")
    detector = files["detector.json"]
    return (network or str(files["network.safetensors"]),
            encoder or str(files["encoder.safetensors"]),
            str(detector) if detector.is_file() else None)


def check_data_policy(model: AnoModel, data: str | os.PathLike) -> None:
    """Refuse, in one sentence, prepared data whose recorded preprocessing differs from the
    model's (both must be recorded for the check)."""
    from anodata.policy import read_prepared_policy

    policy = model.recorded_policy
    prepared = read_prepared_policy(data)
    if policy is None or prepared is None:
        return
    prepared = prepared.at(model.resolution, model.channels)
    if prepared != policy:
        diff = ", ".join(f"{k} {v!r} (model: {policy.to_dict()[k]!r})"
                         for k, v in prepared.to_dict().items() if policy.to_dict()[k] != v)
        raise UserError(f"--data {data} was prepared with another preprocessing than the model "
                        f"was trained on ({diff}); prepare it again with `anostyle prepare "
                        f"--model DIR` or the model's options.")

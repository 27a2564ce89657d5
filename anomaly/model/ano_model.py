"""The one inference model: generator G, discriminator D, encoder E, the izif settings, the
preprocessing policy and, from a model folder, the tuned detector; loaded once by
`AnoModel.load` (network and encoder files) or `AnoModel.open` (a model folder) for every
command and the Python API.

    model = AnoModel.open("models/ham64-cpu")                   # with its detector.json
    scores = model.score(PIL.Image.open("ISIC_0024307.jpg"), methods="izif,residual:mean")
    answer = model.judge("ISIC_0024307.jpg")                    # score, percentile, decision

izif (Schlegl et al. 2019, f-AnoGAN, eq. 8-9) weighs the discriminator-feature term by kappa at
one D layer. ONE place decides kappa and that layer (`resolve_izif`): the explicit argument
(`open` passes the detector's recorded ones), else the score configuration recorded with a
score sheet (serve), else the encoder's training options, else the defaults. The policy is the encoder's, else the network's, else the defaults
(with a warning when a raw image is fitted: e.g. an official NVlabs pickle records none).

The passes the model makes are plain functions here too (used by training and projection):
`reconstruct_batch` x -> E(x) -> G(E(x)) (f-AnoGAN, Sec. 2.2) and `discriminator_features`,
the f(.) of the izif loss and score.

Shape letters: N batch, C channels, H/W height/width, K number of style vectors, D w_dim.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from anodata.policy import POLICY_KEY, Preprocessing, fit_array, fit_image
from anomaly.methods import detector_scores as ds
from anomaly.methods import registry
from anomaly.methods.detector import (Detector, DetectorScorer, Judgement, Scorer, config_name,
                                      load_detector, resolve_model_dir)
from anomaly.model.encoder import Encoder
from anomaly.model.encoder_io import check_compatible, check_pairing, load_encoder
from anomaly.methods.scores import (Forward, check_kappa, izif_score, latent_distance,
                                    pixel_distance, torch_euclidean)
from stylegan.checkpoint import load_network
from stylegan.errors import UserError
from stylegan.fileio import sha256_file
from stylegan.imageio import to_8bit
from stylegan.imageutil import from_uint8
from stylegan.runtime import resolve_device

DEFAULT_KAPPA, DEFAULT_LAYER = 1.0, "b8"
DEFAULT_METHODS = "izif,sklearn:euclidean,sklearn:manhattan,sklearn:cosine,torch-euclidean,latent"


# ----------------------------------------------------------------------------------------------
# Encoder + generator + discriminator features (used by AnoModel, fit, project, score and tsne)


def encode(E: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] -> codes ws [N, K, D]."""
    res = E.img_resolution
    assert images.ndim == 4 and images.shape[1:] == (E.img_channels, res, res), \
        f"images must be [N, {E.img_channels}, {res}, {res}], got {tuple(images.shape)}"
    return E(images)


def reconstruct_batch(G: torch.nn.Module, E: torch.nn.Module, images: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, H, W] in [-1, 1] -> (ws [N, K, D], G.synthesis(ws) [N, C, H, W]).

    Gradients flow unless the caller wraps the call in torch.no_grad() (training needs them).
    """
    ws = encode(E, images)
    return ws, G.synthesis(ws, noise_mode="const")


def feature_layer_names(D: torch.nn.Module) -> list[str]:
    """Names `discriminator_features` accepts: 'b{res}' from img_resolution down to 8, then
    'b4.conv', 'b4.fc'."""
    return [f"b{res}" for res in D.block_resolutions] + ["b4.conv", "b4.fc"]


def check_feature_layer(D: torch.nn.Module, layer: str) -> None:
    """Refuse a `--feature-layer` name the discriminator does not have, in one sentence."""
    names = feature_layer_names(D)
    if layer not in names:
        raise UserError(f"--feature-layer {layer!r} is not a layer of this discriminator; "
                        f"choose one of {', '.join(names)}.")


def discriminator_features(D: torch.nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """Features f(x) at `layer` (see feature_layer_names), float32.

    'b{res}' runs only the blocks up to that one: each image's features are its own. 'b4.conv'
    and 'b4.fc' pass through D's minibatch-stddev layer, which mixes the images of a batch; a
    batch not divisible by the group size is padded with copies of its last image.
    """
    if layer.startswith("b4."):
        return _epilogue_features(D, images, layer)
    res = int(layer[1:])
    assert res in D.block_resolutions, f"unknown feature layer {layer!r}"
    x, img = None, images
    for block_res in D.block_resolutions:
        x, img = getattr(D, f"b{block_res}")(x, img)  # [N, ch, block_res/2, block_res/2]
        if block_res == res:
            return x.to(torch.float32)
    raise AssertionError("unreachable")


def _epilogue_features(D: torch.nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    n = images.shape[0]
    group = getattr(getattr(D.b4, "mbstd", None), "group_size", None)
    pad = (-n) % min(group, n) if group else 0
    if pad:
        images = torch.cat([images, images[-1:].expand(pad, -1, -1, -1)])  # [N + pad, C, H, W]
    return D.block_features(images)[layer][:n].to(torch.float32)


# ----------------------------------------------------------------------------------------------
# The inference model


def resolve_izif(kappa: float | None, layer: str | None, *, scored_with: dict[str, Any],
                 trained: dict[str, Any]) -> tuple[float, str, list[str]]:
    """(kappa, feature layer, notes): the argument, else the score sheet's (score.json), else
    the encoder's training options, else the defaults; a note when an argument differs from
    what the score sheet was scored with."""
    notes = []
    for flag, given, key in (("--kappa", kappa, "kappa"),
                             ("--feature-layer", layer, "feature_layer")):
        if given is not None and key in scored_with and given != scored_with[key]:
            notes.append(f"{flag} {given} differs from the {scored_with[key]} the score sheet "
                         f"was scored with: the percentile compares unlike scores")
    kappa = kappa if kappa is not None else scored_with.get("kappa", trained.get("kappa"))
    layer = layer or scored_with.get("feature_layer") or trained.get("feature_layer")
    kappa = DEFAULT_KAPPA if kappa is None else check_kappa(kappa, where="izif's kappa")
    return kappa, (layer or DEFAULT_LAYER), notes


class AnoModel:
    """Frozen G, D, E on one device with their izif settings and preprocessing policy."""

    def __init__(self, G: torch.nn.Module, D: torch.nn.Module | None, E: Encoder | None, *,
                 kappa: float = DEFAULT_KAPPA, feature_layer: str = DEFAULT_LAYER,
                 policy: Preprocessing | None = None, notes: Sequence[str] = (),
                 network: str | None = None, encoder: str | None = None):
        assert kappa >= 0, kappa
        self.G, self.D, self.E = G, D, E
        self.kappa, self.feature_layer = float(kappa), feature_layer
        self.policy_recorded = policy is not None
        self._policy = (policy or Preprocessing()).at(G.img_resolution, G.img_channels)
        self.notes = tuple(notes)
        self.network, self.encoder = network, encoder
        self.device = next(G.parameters()).device
        self.detector: DetectorScorer | None = None  # set by `open` when the folder has one
        if D is not None and self.kappa > 0:
            check_feature_layer(D, feature_layer)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, network: str | os.PathLike, encoder: str | os.PathLike | None = None, *,
             device: str | torch.device = "auto", kappa: float | None = None,
             feature_layer: str | None = None, scored_with: dict[str, Any] | None = None,
             require_D: bool = True, allow_mismatch: bool = False) -> "AnoModel":
        """Load and check the networks (and encoder); every command builds its model here.

        `require_D=False` accepts a network file without discriminator (then no method that
        needs D features can run). kappa / feature layer: see `resolve_izif`. An encoder
        trained for another network file is refused unless `allow_mismatch` (then noted).
        """
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        E, extra = (None, {}) if encoder is None else load_encoder(encoder, device=dev)
        G, D, net_extra = load_networks(network, device=dev, require_D=require_D)
        kappa, layer, notes = resolve_izif(kappa, feature_layer, scored_with=scored_with or {},
                                           trained=extra.get("training_options", {}))
        model = cls(G, D, E, kappa=kappa, feature_layer=layer,
                    policy=_recorded_policy(extra, net_extra), notes=notes,
                    network=str(network), encoder=None if encoder is None else str(encoder))
        if E is not None:
            check_compatible(E, G, encoder_path=encoder, network_path=network)
            pairing = check_pairing(extra, network, allow_mismatch=allow_mismatch,
                                    encoder_path=encoder, network_sha256=model.network_sha256)
            if pairing:  # printed by every command (stderr) and kept with the model's notes
                warnings.warn(pairing, UserWarning, stacklevel=2)
                model.notes += (pairing,)
        return model

    @classmethod
    def open(cls, folder: str | os.PathLike | None = None, *, network: str | None = None,
             encoder: str | None = None, detector: str | None = None,
             device: str | torch.device = "auto", kappa: float | None = None,
             feature_layer: str | None = None, require_D: bool = False,
             allow_mismatch: bool = False) -> "AnoModel":
        """A model folder (network.safetensors, encoder.safetensors and, when there, the
        detector.json of `anostyle tune` with its bank) as one model; an explicit file wins
        over the folder's. kappa and the feature layer: the argument, else the detector's
        recorded ones, else as `load` decides. `judge` then answers as serve does."""
        network, encoder, found = resolve_model_dir(folder, network, encoder)
        detector = detector or found
        recorded = None if detector is None else Detector.load(detector)  # before the networks
        if recorded is not None:
            kappa = recorded.kappa if kappa is None else kappa
            feature_layer = feature_layer or recorded.feature_layer
        model = cls.load(network, encoder, device=device, kappa=kappa,
                         feature_layer=feature_layer, require_D=require_D,
                         allow_mismatch=allow_mismatch)
        if detector is not None:
            model.detector = load_detector(model, detector)  # checks sha256s and the policy
        return model

    @functools.cached_property
    def network_sha256(self) -> str | None:
        """sha256 of the network file, read once per model (pairing and detector checks)."""
        return None if self.network is None else sha256_file(self.network)

    @functools.cached_property
    def encoder_sha256(self) -> str | None:
        """sha256 of the encoder file, read once per model."""
        return None if self.encoder is None else sha256_file(self.encoder)

    # ------------------------------------------------------------------ shapes and policy

    @property
    def policy(self) -> Preprocessing:
        """How raw images are fitted: the recorded policy, else the defaults (with a warning,
        printed once per model, e.g. for an official NVlabs pickle)."""
        if not self.policy_recorded and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"neither {self.encoder or 'the encoder'} nor {self.network} records "
                          f"the preprocessing it was trained with; raw images are fitted with "
                          f"the defaults (center crop, box filter, no colour normalisation)",
                          stacklevel=2)
        return self._policy

    @property
    def recorded_policy(self) -> Preprocessing | None:
        """The recorded policy (at the network's resolution), or None; never warns."""
        return self._policy if self.policy_recorded else None

    @property
    def resolution(self) -> int:
        return self.G.img_resolution

    @property
    def channels(self) -> int:
        return self.G.img_channels

    # ------------------------------------------------------------------ images

    def fit(self, image: Image.Image | bytes | str | os.PathLike) -> np.ndarray:
        """A raw image (PIL image, encoded bytes or a file path) -> uint8 [C, H, W], fitted by
        exactly the model's recorded preprocessing policy."""
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            return fit_array(path.read_bytes(), path.suffix, self.policy)
        if isinstance(image, (bytes, bytearray)):
            return fit_array(bytes(image), "", self.policy)
        if isinstance(image, Image.Image):
            img = fit_image(to_8bit(image, self.policy.channels), self.policy)
            array = np.array(img, dtype=np.uint8)
            array = array[:, :, None] if array.ndim == 2 else array  # [H, W, C]
            return np.ascontiguousarray(array.transpose(2, 0, 1))  # [C, H, W]
        raise TypeError(f"cannot fit a {type(image).__name__}; give a PIL image, bytes or a path")

    def batch(self, images) -> torch.Tensor:
        """Fitted uint8 [N, C, H, W] (tensor or array) or raw image(s) -> uint8 tensor on device."""
        if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
            out = torch.as_tensor(images)
        else:
            raw = images if isinstance(images, (list, tuple)) else [images]
            out = torch.from_numpy(np.stack([self.fit(img) for img in raw]))
        shape = (self.channels, self.resolution, self.resolution)
        assert out.dtype == torch.uint8 and tuple(out.shape[1:]) == shape, \
            f"images must be uint8 [N, {shape}], got {out.dtype} {tuple(out.shape)}"
        return out.to(self.device)

    # ------------------------------------------------------------------ networks

    def _need_encoder(self) -> Encoder:
        if self.E is None:
            raise UserError("This needs an encoder; load the model with encoder=... "
                            "(--encoder).")
        return self.E

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] -> codes ws [N, K, D]."""
        return encode(self._need_encoder(), x)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, H, W] in [-1, 1] -> (ws [N, K, D], G(E(x)) [N, C, H, W]).

        Gradients flow unless the caller wraps the call in torch.no_grad() (training needs them).
        """
        return reconstruct_batch(self.G, self._need_encoder(), x)

    def features(self, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Discriminator features of images [N, C, H, W] at `layer` (default: the model's)."""
        if self.D is None:
            raise UserError(f"{self.network} holds no discriminator, which the feature term "
                            f"needs; give a full training snapshot or use kappa 0.")
        return discriminator_features(self.D, x, layer or self.feature_layer)

    @torch.no_grad()
    def forward(self, images_u8: torch.Tensor, *, features: bool = True) -> Forward:
        """ONE pass of E, G (and D on both, when `features`) over a fitted uint8 batch."""
        x = from_uint8(images_u8.to(self.device))  # [N, C, H, W]
        ws, rec = self.reconstruct(x)
        feat = feat_rec = None
        if features and self.feature_layer.startswith("b4."):  # minibatch stddev mixes a batch
            feat, feat_rec = self.features(x), self.features(rec)
        elif features:  # 'b{res}' features are per image: x and G(E(x)) in one D pass
            feat, feat_rec = self.features(torch.cat([x, rec])).split(len(x))
        return Forward(x, ws, rec, feat, feat_rec)

    # ------------------------------------------------------------------ scores

    def score(self, images, methods: str | Sequence[str] = "izif", *,
              tta: bool = False) -> dict[str, np.ndarray]:
        """Anomaly scores (higher = more anomalous) of raw or fitted images: {name: float64 [N]}.

        `methods`: any names of anomaly.methods.registry, classic (izif, sklearn:..., latent) or
        the detector's (residual:mean, izif:KAPPA, knn-latent:K, ...; those needing a bank take
        the detector's). With `tta` every method is averaged over the 8 views ('<method>@tta').
        """
        text = methods if isinstance(methods, str) else ",".join(methods)
        specs = registry.parse_list(text)
        names = [s.name for s in specs]
        batch = self.batch(images)
        if not tta and all(s.system == "classic" for s in specs):
            scores = self.score_forward(self.forward_for(batch, names), names)
        else:
            bank = None if self.detector is None else self.detector.bank
            scores = Scorer(self, [(m, tta) for m in names], bank=bank).score_batch(batch)
        return {config_name(m, tta): np.asarray(scores[config_name(m, tta)], dtype=np.float64)
                for m in names}

    def judge(self, image) -> Judgement:
        """The detector's (score, percentile, decision) of one image, as serve answers: a fitted
        uint8 [C, H, W] array/tensor, or a raw image (PIL, bytes, path), fitted by the model's
        recorded policy. A score that is not finite raises detector_scores.NonFiniteScore (no
        percentile, no decision). A detector without validation normals (serve's izif mode
        without izif.xlsx) answers no percentile (None). The pass that made the score stays in
        `self.detector.scorer.last_forward` (view 0: pictures and izif's terms)."""
        if self.detector is None:
            raise UserError(f"{self.network} was opened without a detector; open a model folder "
                            f"holding the detector.json of `anostyle tune` (AnoModel.open).")
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 3:
            batch = self.batch(torch.as_tensor(np.array(image))[None])
        else:
            batch = self.batch(image)
        score = float(self.detector.score_batch(batch)[0])
        d = self.detector.detector
        name = f"'{image}'" if isinstance(image, (str, os.PathLike)) else "the image"
        reference = np.asarray(d.val_normals, dtype=np.float64)  # sorted (the schema checks)
        decision = ds.decide(score, d.threshold, image=name)  # NonFiniteScore before anything
        percentile = ds.weak_percentile(score, reference, image=name) if len(reference) else None
        return Judgement(score, percentile, decision, d.threshold, d.threshold_rule, d.method)

    def forward_for(self, images_u8: torch.Tensor, methods: Sequence[str]) -> Forward:
        """The forward pass the classic `methods` need (D only when one of them uses features)."""
        needs_features = (any(registry.parse(m).needs_features for m in methods)
                          and self.kappa > 0)
        return self.forward(images_u8, features=needs_features)

    def score_forward(self, out: Forward, methods: Sequence[str]) -> dict[str, np.ndarray]:
        """Every method of `methods` from one forward pass: {method: float64 [N]}."""
        scores: dict[str, np.ndarray] = {}
        for method in methods:
            spec = registry.parse(method)
            if spec.family == "izif":
                value = izif_score(out.x, out.rec, out.feat, out.feat_rec, kappa=self.kappa)
            elif spec.family == "sklearn":
                value = pixel_distance(out.x, out.rec, spec.metric)
            elif spec.family == "torch-euclidean":
                value = torch_euclidean(out.x, out.rec)
            elif spec.family == "latent":
                value = latent_distance(out.ws, self.G.mapping.w_avg)
            else:  # a detector method, or a new classic family that lacks its line here
                raise AssertionError(f"no classic scoring rule for {method}")
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            scores[method] = np.asarray(value, dtype=np.float64)
        return scores


# ----------------------------------------------------------------------------------------------
# Loading helpers


def load_networks(path: str | os.PathLike, *, device: torch.device, require_D: bool
                  ) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]]:
    """(G, D, extra) from a network file, frozen, eval mode; G is G_ema when the file has it;
    `extra` is the checkpoint's recorded extra dict ({} for official pickles)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--network {path} does not exist; give a network-snapshot .pkl or "
                        f".safetensors file.")
    nets = load_network(path)
    G = nets.get("G_ema") if nets.get("G_ema") is not None else nets.get("G")
    D = nets.get("D")
    if G is None:
        raise UserError(f"--network {path} holds no generator; give a snapshot with G or G_ema.")
    if require_D and D is None:
        raise UserError(f"--network {path} holds no discriminator, which the feature loss needs; "
                        f"give a full training snapshot or pass --kappa 0.")
    G = G.to(device).eval().requires_grad_(False)
    D = None if D is None else D.to(device).eval().requires_grad_(False)
    extra = (nets.get("meta") or {}).get("extra") or {}
    return G, D, extra if isinstance(extra, dict) else {}


def _recorded_policy(encoder_extra: dict, network_extra: dict) -> Preprocessing | None:
    """The encoder's recorded policy, else the network's, else None."""
    for extra, what in ((encoder_extra, "the encoder"), (network_extra, "the network")):
        if extra.get(POLICY_KEY) is not None:
            return Preprocessing.from_dict(extra[POLICY_KEY], source=what)
    return None

"""What `anostyle serve` computes for one uploaded image, without any web code.

Two modes, one `ServeModel`, one path: both answer through AnoModel.judge of a model with a
detector (`ServeScorer`):
  detector  (--model DIR with detector.json, or --detector JSON) the tuned detector of
            `anostyle tune` (anomaly.methods.detector): its score, its threshold, and the percentile
            among its scores of the validation naevi, all from detector.json;
  izif      (--network --encoder --summary) the mode described below, as a detector built in
            memory (`izif_detector`): one classic `izif` component, no bank, no checksums.
In both, uploads are fitted by the model's recorded preprocessing policy, and `method` names
the score ('izif', or the detector's method, e.g. 'rank-average(residual:mean@tta +
residual:mean)'). A detector of detector.json has no izif terms (pixel_term / feature_term
are None); the izif mode's come from the pass that made its score. Pictures come from that
pass's reconstruction of view 0 (Scorer.last_forward), or are left out (None) when it computes
none (e.g. a D-feature density): no extra pass is run for pictures or terms.
A component score that is not finite makes the detector's score NaN, which serve refuses.

In izif mode the score is f-AnoGAN's izif anomaly score (Schlegl et al. 2019, Medical Image
Analysis 54, eq. 8-9): A(x) = 1/n ||x - G(E(x))||^2 + kappa * 1/n_d ||f(x) - f(G(E(x)))||^2,
computed by the model's classic izif (anomaly.methods.scores.izif_score) on the image fitted
to the network as `anostyle prepare` fits it.
It is put in context twice:
  percentile  the share (in %) of validation naevi (izif.xlsx rows with split 'val', label 0)
              whose score is <= this score ("weak" percentile of rank); omitted (None, with
              a note) when there is no izif.xlsx;
  decision    'anomalous' when score >= the izif threshold `anostyle evaluate` chose on the
              validation split (summary.json, first izif row = primary comparison), else 'normal'.
kappa and the feature layer follow the score sheet's score.json, else the encoder's training
options (anomaly.model.ano_model.resolve_izif), so that the score is on the scale of the sheet and
of the threshold; uploads are fitted by the model's recorded preprocessing policy.

Shape letters: C channels, H/W height/width (the network resolution).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anodata.policy import Preprocessing
from anomaly.methods import detector_scores as ds
from anomaly.methods.detector import (Component, Detector, DetectorScorer, Judgement,
                                      resolve_model_dir)
from anomaly.model.ano_model import AnoModel
from anomaly.model.reconstruct import residual_images
from anomaly.methods.scores import izif_terms
from stylegan.errors import UserError
from stylegan.fileio import read_user_json
from stylegan.imageio import MAX_PIXELS
from stylegan.imageutil import to_uint8

IZIF_SHEET = "izif.xlsx"
SCORE_CONFIG = "score.json"


@dataclass(frozen=True)
class ServeOptions:
    """Options of `anostyle serve`."""

    network: str | None  # None: --model's network.safetensors
    encoder: str | None  # None: --model's encoder.safetensors
    summary: str | None  # graphics/summary.json from `anostyle evaluate` (izif mode only)
    scores: str | None = None  # folder with izif.xlsx (or the sheet); None: summary's scores_dir
    model: str | None = None  # model folder: network, encoder and detector.json
    detector: str | None = None  # detector.json from `anostyle tune`; None: --model's
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0  # whole request body, all files together
    max_pixels: int = 24_000_000  # width x height from the header: 6000 x 4000 dermoscopy
    max_files: int = 16  # image parts per request
    kappa: float | None = None  # None: score.json's, else the encoder's training kappa
    feature_layer: str | None = None  # None: score.json's, else the encoder's
    threads: int | None = None  # torch CPU threads; None: min(4, CPU count)
    device: str = "auto"
    allow_mismatch: bool = False  # serve an encoder trained for another network (with a note)

    def check(self) -> "ServeOptions":
        """Refuse impossible limits with one sentence each; returns self."""
        if not 0 < self.max_upload_mb <= 1024:
            raise UserError(f"--max-upload-mb {self.max_upload_mb} is out of range; use a value "
                            f"in (0, 1024], e.g. 20.")
        if not 0 < self.max_pixels <= MAX_PIXELS:
            raise UserError(f"--max-pixels {self.max_pixels} is out of range; use 1 to "
                            f"{MAX_PIXELS} (the decoder's own limit).")
        if self.max_files < 1:
            raise UserError(f"--max-files {self.max_files} must be at least 1.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a TCP port; use 1-65535 (0: any free).")
        return self

    def resolve(self) -> "ServeOptions":
        """The files to serve: --model's network, encoder and detector.json unless given
        explicitly; a detector (explicit or the folder's) selects the detector mode. Missing
        files and flags of the other mode are refused with one sentence each."""
        network, encoder, found = self.network, self.encoder, None
        if self.model is not None:
            network, encoder, found = resolve_model_dir(self.model, network, encoder)
        detector = self.detector or found
        if detector is not None:
            _refuse_izif_flags(self, detector)
            missing = _missing(("--network", network), ("--encoder", encoder))
            if missing:
                raise UserError(f"{missing}; --detector needs --network and --encoder, or "
                                f"--model DIR (a model folder).")
        elif self.model is not None and self.summary is None:
            raise UserError(f"--model {self.model} holds no detector.json; run `anostyle tune` "
                            f"and copy its detector.json (and bank.safetensors) into the "
                            f"folder, or give --summary graphics/summary.json to serve izif.")
        else:
            missing = _missing(("--network", network), ("--encoder", encoder),
                               ("--summary", self.summary))
            if missing:
                raise UserError(f"{missing}; give --network, --encoder and --summary (izif), "
                                f"or --model DIR (a model folder with the detector.json of "
                                f"`anostyle tune`).")
        return dataclasses.replace(self, network=network, encoder=encoder, detector=detector)


def _missing(*flags: tuple[str, str | None]) -> str:
    """'--encoder and --summary are missing' for the flags without a value ('' when none)."""
    names = [flag for flag, value in flags if not value]
    if not names:
        return ""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{listed} {'is' if len(names) == 1 else 'are'} missing"


def _refuse_izif_flags(opts: ServeOptions, detector: str) -> None:
    """One sentence when a flag of the izif mode comes with a detector."""
    given = [flag for flag, value in (("--summary", opts.summary), ("--scores", opts.scores),
                                      ("--kappa", opts.kappa),
                                      ("--feature-layer", opts.feature_layer))
             if value is not None]
    if given:
        one = len(given) == 1
        raise UserError(f"{', '.join(given)} only {'applies' if one else 'apply'} to the izif "
                        f"mode, but the detector {detector} is served (its score, threshold and "
                        f"percentile come from it); leave {'it' if one else 'them'} out, or "
                        f"serve izif with --network, --encoder and --summary instead of "
                        f"--model/--detector.")


@dataclass(frozen=True)
class Decision:
    """The validation threshold: score >= threshold is called anomalous (the evaluation's izif
    threshold, or the detector's)."""

    threshold: float
    rule: str  # e.g. 'youden (val)', 'p95 (val)', 'fixed'
    comparison: str  # e.g. 'nv vs mel'
    source: str  # the summary.json or detector.json it came from


@dataclass(frozen=True)
class Reference:
    """Validation naevi's scores (sorted) for the percentile, or why there are none."""

    scores: np.ndarray | None  # float64 [M], ascending; None: percentile omitted
    source: str | None  # the izif.xlsx or detector.json read
    note: str  # why the percentile is omitted ('' when it is not)
    scored_with: dict[str, Any]  # kappa / feature_layer from score.json beside the sheet

    @property
    def count(self) -> int:
        return 0 if self.scores is None else int(len(self.scores))


def load_decision(path: str | os.PathLike) -> tuple[Decision, dict[str, Any]]:
    """(the first izif row's threshold, the recorded evaluate options) from summary.json."""
    path = Path(path)
    fix = "give the graphics/summary.json that `anostyle evaluate` wrote"
    body = read_user_json(path, flag="--summary", fix=fix)
    rows = body.get("rows") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise UserError(f"--summary {path} has no 'rows' list; {fix}.")
    izif = [r for r in rows if isinstance(r, dict) and r.get("method") == "izif"]
    if not izif:
        raise UserError(f"--summary {path} has no izif row; score with the izif method and run "
                        f"`anostyle evaluate` again.")
    threshold = izif[0].get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold):
        raise UserError(f"--summary {path}: the izif threshold {threshold!r} is not a finite "
                        f"number; run `anostyle evaluate` again.")
    decision = Decision(float(threshold), str(izif[0].get("threshold_rule", "")),
                        str(izif[0].get("comparison", "")), str(path))
    options = body.get("options")
    return decision, options if isinstance(options, dict) else {}


def load_reference(scores: str | None, summary_options: dict[str, Any]) -> Reference:
    """The validation naevi of izif.xlsx in `scores` (a folder or the sheet itself).

    Without `scores` the folder recorded in summary.json (`options.scores_dir`) is tried; when
    that holds no sheet, the percentile is omitted with a note instead of an error.
    """
    from anomaly.evaluation.sheets import read_score_sheet  # openpyxl/pandas: only when serving

    if scores is None:
        recorded = summary_options.get("scores_dir")
        if not recorded:
            return Reference(None, None, "percentile omitted: summary.json records no scores "
                                         "folder; pass --scores DIR", {})
        sheet = Path(recorded) / IZIF_SHEET
        if not sheet.is_file():
            return Reference(None, None, f"percentile omitted: no {IZIF_SHEET} in {recorded} "
                                         f"(the scores folder summary.json records); pass "
                                         f"--scores DIR", {})
    else:
        sheet = Path(scores) / IZIF_SHEET if Path(scores).is_dir() else Path(scores)
        if not sheet.is_file():
            raise UserError(f"--scores {scores} holds no {IZIF_SHEET}; give the folder that "
                            f"`anostyle score` wrote.")
    df = read_score_sheet(sheet)
    values = np.sort(df.loc[(df["split"] == "val") & (df["label"] == 0), "score"]
                     .to_numpy(dtype=np.float64))  # [M]
    scored_with = _score_config(sheet.parent / SCORE_CONFIG)
    if len(values) == 0:
        return Reference(None, str(sheet), f"percentile omitted: {sheet} has no validation "
                                           f"naevi (split val, label 0); score val.zip too",
                         scored_with)
    return Reference(values, str(sheet), "", scored_with)


def _score_config(path: Path) -> dict[str, Any]:
    """kappa and feature_layer recorded by `anostyle score` (empty when absent or unreadable)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(body, dict):
        return {}
    return {k: body[k] for k in ("kappa", "feature_layer") if body.get(k) is not None}


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class ImageScore:
    """The score of one fitted image and the pictures shown with it (uint8 [H, W, C])."""

    score: float  # the detector's score (izif mode: A_R + kappa * A_D); NaN when not finite
    pixel_term: float | None  # izif's A_R: mean squared pixel residual; None for a detector
    feature_term: float | None  # izif's A_D: mean squared feature residual (0 when kappa is 0)
    image: np.ndarray  # the input as fitted
    reconstruction: np.ndarray | None  # G(E(x)); None: the detector computes none
    residual: np.ndarray | None  # mean_c |x - G(E(x))| in the fixed-scale colour map, [H, W, 3]
    method: str  # 'izif' or the detector's method name
    judgement: Judgement | None = None  # AnoModel.judge's answer; None when not finite


class ServeScorer:
    """A model with its detector, answering through AnoModel.judge for a fitted uint8
    [C, H, W] image. In the izif mode (`izif_terms`) the answer carries izif's two terms and
    settings, from the pass that made the score; a detector of detector.json has none (its
    own kappa or layers are part of its method name). A score that is not finite comes back
    as NaN without a judgement, which serve refuses naming the upload: a rank average would
    turn +inf into a finite 100."""

    def __init__(self, model: AnoModel, *, izif_terms: bool = False):
        assert model.detector is not None, "serve answers through the model's detector"
        self.model, self.detector, self.izif_terms = model, model.detector, izif_terms
        self.method = self.detector.detector.method
        self.kappa = model.kappa if izif_terms else None
        self.feature_layer = model.feature_layer if izif_terms else None

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def policy(self) -> Preprocessing:
        """The preprocessing the model was trained with (uploads are fitted by it)."""
        return self.model.policy

    @torch.no_grad()
    def __call__(self, fitted: np.ndarray) -> ImageScore:
        shape = (self.channels, self.resolution, self.resolution)
        assert fitted.dtype == np.uint8 and fitted.shape == shape, (fitted.dtype, fitted.shape)
        assert self.model.detector is self.detector, "the detector must be its model's"
        try:
            judgement = self.model.judge(fitted)  # score, percentile, decision
        except ds.NonFiniteScore:
            judgement = None
        score = math.nan if judgement is None else judgement.score
        image = np.ascontiguousarray(fitted.transpose(1, 2, 0))
        out = self.detector.scorer.last_forward  # view 0 of this image, when reconstructed
        if out is None:
            return ImageScore(score, None, None, image, None, None, self.method, judgement)
        pixel = feature = None
        if self.izif_terms:
            a_r, a_d = izif_terms(out.x, out.rec, out.feat, out.feat_rec)  # [1] each
            pixel, feature = float(a_r[0]), float(a_d[0])
        return ImageScore(score, pixel, feature, image, to_uint8(out.rec)[0],
                          residual_images(out.x, out.rec)[0], self.method, judgement)


def izif_detector(model: AnoModel, decision: Decision, reference: Reference) -> AnoModel:
    """The izif mode as a model with a detector held in memory: one classic `izif` component
    at the model's kappa and layer, the evaluation's threshold (summary.json) and the
    validation naevi of izif.xlsx (none: no percentile); no bank, no checksums. Returns a
    shallow copy of `model` (same networks) holding it; `model` itself is left as it is."""
    normals = () if reference.scores is None else tuple(float(v) for v in reference.scores)
    record = Detector(components=(Component(method="izif", tta=False),), combine="single",
                      threshold=decision.threshold, threshold_rule=decision.rule,
                      comparison=decision.comparison, val_normals=normals, selection={},
                      bank=None, network_sha256=None, encoder_sha256=None, preprocessing=None,
                      kappa=model.kappa, feature_layer=model.feature_layer)
    judged = copy.copy(model)
    judged.detector = DetectorScorer(judged, record, None)
    return judged


@dataclass(frozen=True)
class ServeModel:
    """Everything loaded once at start: the scorer, the threshold, the reference scores."""

    scorer: ServeScorer
    decision: Decision
    reference: Reference  # the percentile's count and note (the scores are the detector's)
    notes: tuple[str, ...] = ()

    def answer(self, s: ImageScore) -> dict[str, Any]:
        """What serve answers for a checked score: its judgement (AnoModel.judge)."""
        j = s.judgement
        assert j is not None, "serve refuses a non-finite score before answering"
        return {"percentile": j.percentile, "percentile_note": self.reference.note,
                "reference_count": self.reference.count, "decision": j.decision,
                "threshold": j.threshold, "threshold_rule": j.threshold_rule,
                "comparison": self.decision.comparison}

    def info(self) -> dict[str, Any]:
        """What the page shows before any upload (GET /api/info)."""
        s = self.scorer
        return {"resolution": s.resolution, "channels": s.channels, "method": s.method,
                "kappa": s.kappa, "feature_layer": s.feature_layer,
                "threshold": self.decision.threshold, "threshold_rule": self.decision.rule,
                "comparison": self.decision.comparison,
                "reference_count": self.reference.count,
                "percentile_note": self.reference.note, "notes": list(self.notes)}


def izif_serve_model(model: AnoModel, decision: Decision, reference: Reference,
                     notes: tuple[str, ...] = ()) -> ServeModel:
    """The izif mode of serve on a loaded model: its izif detector (izif_detector) answers."""
    judged = izif_detector(model, decision, reference)
    return ServeModel(ServeScorer(judged, izif_terms=True), decision, reference, notes)


def load_serve_model(opts: ServeOptions) -> ServeModel:
    """Load networks, threshold and reference once; bad files end in one-sentence UserErrors."""
    opts = opts.resolve()
    if opts.detector is not None:
        return load_detector_model(opts)
    decision, summary_options = load_decision(opts.summary)  # cheap checks before the networks
    reference = load_reference(opts.scores, summary_options)
    model = AnoModel.load(opts.network, opts.encoder, device=opts.device, kappa=opts.kappa,
                          feature_layer=opts.feature_layer, scored_with=reference.scored_with,
                          require_D=False, allow_mismatch=opts.allow_mismatch)
    if model.kappa > 0 and model.D is None:
        raise UserError(f"--network {opts.network} holds no discriminator, which the feature "
                        f"loss needs; give a full training snapshot or pass --kappa 0.")
    return izif_serve_model(model, decision, reference, model.notes)


def load_detector_model(opts: ServeOptions) -> ServeModel:
    """The detector mode of resolved options: threshold, rule, comparison and the validation
    naevi's scores (the percentile's reference) all from detector.json."""
    model = AnoModel.open(network=opts.network, encoder=opts.encoder, detector=opts.detector,
                          device=opts.device, allow_mismatch=opts.allow_mismatch)
    det = model.detector.detector  # its kappa and layer are detector.json's
    decision = Decision(det.threshold, det.threshold_rule, det.comparison, str(opts.detector))
    reference = Reference(np.sort(np.asarray(det.val_normals, dtype=np.float64)),  # [M]
                          str(opts.detector), "", {})
    return ServeModel(ServeScorer(model), decision, reference, model.notes)

"""`anostyle adapt`: a model folder for a new collection, in one command.

A detector tuned on one collection rarely transfers as it is to another (another dermatoscope,
camera, framing): the shipped HAM10000 detector is near chance elsewhere, and choosing its
configuration again on the new collection's own validation split is what helps most. `adapt`
does that whole recipe and leaves a complete model folder:

1. prepare  the collection with the parent model's recorded preprocessing (official splits
            honoured), or take an already prepared folder (`--prepared`, same policy);
2. gan      optionally fine-tune the GAN from the parent network on the training normals
            (`--kimg N`; 0 keeps the parent's network);
3. encoder  optionally train the encoder warm-started from the parent encoder
            (`--encoder-kimg N`; 0 keeps it), its checkpoint chosen on the validation normals;
4. tune     choose the scoring configuration on the validation split, with the collection's
            own training normals as the bank (rules of `anostyle tune`; a simpler rule where
            the split is too small for the asked one, said in the model card);
5. assemble network, encoder, detector.json, bank, splits.csv, tune.xlsx and a model card;
6. test     read the test split ONCE, after every choice: `score` + `evaluate --primary
            detector` into DEST/evaluation (`--no-test` skips it).

Everything is assembled in a work folder beside DEST (`DEST.adapt-work`) and moved into place
at the end, so DEST is never half-written. The work folder records which steps finished and
with which options: the same command again continues after the last finished step (and a
killed GAN or encoder run continues from its last checkpoint); other options are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from anodata.prepared import PreparedDataset
from anomaly.scoring.tune import DEFAULT_GRID
from stylegan.errors import UserError
from stylegan.fileio import atomic_write_json, sha256_file

STEPS = ("prepare", "gan", "encoder", "tune", "assemble", "test")
WORK_SUFFIX = ".adapt-work"
STATE_FILE = "adapt-state.json"
# The simpler rules when the validation split is small. Below MIN_ANOMALIES anomalies (or
# normals) a choice among dozens of configurations mostly picks noise (the standard error of an
# AUC with 10 anomalies is about 0.08), so the parent's own configuration is kept and only its
# bank, threshold and reference scores are refitted on the collection; below FEW_ANOMALIES the
# grid is tried without TTA and rank averages (fewer, cheaper candidates).
MIN_ANOMALIES = 10
FEW_ANOMALIES = 30
# Rough costs on 2 CPU cores at 64 px, for the printed estimates and the split of --minutes
# between the steps (the training steps are held to their share by --max-minutes; the others
# are estimated). They scale with the number of pixels.
SECONDS_PER_GAN_KIMG = 100.0
SECONDS_PER_ENCODER_KIMG = 35.0
SECONDS_PER_VIEW = 0.02  # one image through E, G and D
SECONDS_PER_PREPARED_IMAGE = 0.004
SECONDS_FOR_EVALUATE = 60.0


@dataclass(frozen=True)
class AdaptOptions:
    """Options of `anostyle adapt` (saved as adapt.json in the model folder)."""

    model: str  # the parent model folder (network.safetensors, encoder.safetensors)
    dest: str  # the new model folder (must not exist)
    # The collection: an already prepared folder, or the data options of `anostyle prepare`.
    prepared: str | None = None
    source: str | None = None
    labels: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    group_column: str | None = None
    onehot_columns: tuple[str, ...] = ()
    onehot_zero_class: str | None = None
    split_column: str | None = None
    splits_from: str | None = None
    normal: tuple[str, ...] = ()
    # A seeded grouped split when the collection has none: more validation than `prepare`'s
    # default (0.1), since every choice is made on it.
    val: float = 0.2
    test: float = 0.2
    seed: int = 0
    max_per_class: int | None = None
    workers: int | None = None
    # An official split's training anomalies join val (training uses normals only, and every
    # choice is made on val: more anomalies there make a steadier choice); test stays as given.
    train_anomalies: str = "val"
    # Fine-tuning: 0 keeps the parent's network / encoder. On validation the parent's networks
    # with a re-tuned detector did best (see the README), so nothing is trained by default.
    kimg: float = 0.0
    encoder_kimg: float = 0.0
    minutes: float | None = None  # a time budget shared between the steps
    # Tuning (as `anostyle tune`).
    grid: str = DEFAULT_GRID
    select: str = "auc"
    tolerance: float = 0.01
    by: tuple[str, ...] = ()
    min_subgroup: int = 20
    normal_class: str | None = None
    anomaly_class: str | None = None
    threshold: str = "youden"
    bootstrap: int = 500
    bank_size: int = 2000
    read_test: bool = True  # False: --no-test
    batch: int = 64
    device: str = "auto"

    def fingerprint(self) -> str:
        """What must match for a re-run to continue an unfinished work folder (the time
        budget, the device, workers and batch do not change the result)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("minutes", "device", "workers", "batch")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())\
            .hexdigest()


@dataclass
class _Work:
    """The work folder and what the finished steps left in it."""

    root: Path
    state: dict[str, Any]
    echo: Callable[[str], None]
    start: float
    deadline: float | None

    @property
    def data(self) -> Path:
        return Path(self.state["data"])

    def done(self, step: str) -> bool:
        return step in self.state["steps"]

    def finish(self, step: str, seconds: float, **info: Any) -> None:
        self.state["steps"][step] = {"seconds": round(seconds, 1), **info}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.root / STATE_FILE, self.state)


def adapt(opts: AdaptOptions, *, command: str | None = None,
          echo: Callable[[str], None] = print) -> Path:
    """Run every step (see the module docstring); returns the model folder DEST."""
    parent, dest = _check_options(opts)
    work = _open_work(opts, dest, echo=echo, command=command)
    steps = [("prepare", _step_prepare), ("gan", _step_gan), ("encoder", _step_encoder),
             ("tune", _step_tune), ("assemble", _step_assemble), ("test", _step_test)]
    for number, (name, run) in enumerate(steps, 1):
        label = f"[{number}/{len(steps)}] {name}"
        if work.done(name):
            echo(f"{label}: finished earlier ({_duration(work.state['steps'][name]['seconds'])})")
            continue
        began = time.time()
        info = run(opts, parent, work, label) or {}
        work.finish(name, time.time() - began, **info)
        echo(f"{label}: done in {_duration(time.time() - began)}")
    model_dir = work.root / "model"
    _write_card(opts, parent, work, model_dir)
    model_dir.rename(dest)
    shutil.rmtree(work.root, ignore_errors=True)
    echo(f"model folder: {dest} ({_duration(time.time() - work.start)} in this run)")
    return dest


# ------------------------------------------------------------------------------ set-up


def _check_options(opts: AdaptOptions) -> tuple[Path, Path]:
    parent, dest = Path(opts.model), Path(opts.dest)
    from anomaly.methods.detector import resolve_model_dir

    resolve_model_dir(parent, None, None)  # a folder with network + encoder, or one sentence
    if dest.exists():
        raise UserError(f"--dest {dest} already exists; choose a new folder name (adapt never "
                        f"overwrites a model folder).")
    if (opts.prepared is None) == (opts.source is None):
        raise UserError("give the collection either as --source (raw images, with the data "
                        "options of `anostyle prepare`) or as --prepared DIR, not both.")
    if opts.source is not None and not opts.normal:
        raise UserError("--normal is missing; name the normal class(es) of the collection, "
                        "e.g. --normal nevus.")
    if opts.kimg < 0 or opts.encoder_kimg < 0:
        raise UserError("--kimg and --encoder-kimg must be 0 (keep) or positive.")
    if opts.kimg > 0 and opts.encoder_kimg == 0:
        raise UserError("--kimg fine-tunes the GAN, and the parent's encoder does not fit the "
                        "new network; give --encoder-kimg too (e.g. --encoder-kimg 12).")
    if opts.minutes is not None and opts.minutes <= 0:
        raise UserError(f"--minutes {opts.minutes} must be positive.")
    return parent, dest


def _open_work(opts: AdaptOptions, dest: Path, *, echo, command: str | None) -> _Work:
    root = dest.with_name(dest.name + WORK_SUFFIX)
    state_path = root / STATE_FILE
    start = time.time()
    deadline = None if opts.minutes is None else start + 60 * opts.minutes
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != opts.fingerprint():
            raise UserError(f"{root} holds an unfinished adapt run with other options; repeat "
                            f"that run's command to continue it, or remove {root}.")
        finished = [s for s in STEPS if s in state["steps"]]
        echo(f"continuing the adapt run in {root} (finished: {', '.join(finished) or 'none'})")
        return _Work(root, state, echo, start, deadline)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists but holds no adapt run; remove it or choose another "
                        f"--dest.")
    root.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": opts.fingerprint(), "command": command, "steps": {},
             "data": str(Path(opts.prepared).resolve()) if opts.prepared else str(root / "data")}
    work = _Work(root, state, echo, start, deadline)
    work.save()
    return work


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------ step 1: data


def _step_prepare(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    from anodata.modelpolicy import check_policy_matches, read_model_policy
    from anodata.policy import read_prepared_policy

    if opts.prepared is not None:
        prepared = Path(opts.prepared)
        policy = read_prepared_policy(prepared)
        if policy is None:
            raise UserError(f"--prepared {prepared} records no preprocessing (prepare.json); "
                            f"prepare it with `anostyle prepare --model {parent}`.")
        try:
            check_policy_matches(parent, policy)
        except UserError as exc:
            raise UserError(f"--prepared {prepared} was not prepared with the parent model's "
                            f"policy ({exc}); prepare it again with `anostyle prepare --model "
                            f"{parent}`, or give --source.") from None
        work.echo(f"{label}: using {prepared} (the parent's preprocessing)")
    else:
        from anodata.prepare import PrepareOptions, format_summary, prepare_dataset

        policy = read_model_policy(parent).policy
        work.echo(f"{label}: preparing {opts.source} with the parent's preprocessing "
                  f"({policy.resolution} px)")
        summary = prepare_dataset(PrepareOptions(
            source=Path(opts.source), dest=work.data, normal=opts.normal,
            labels=None if opts.labels is None else Path(opts.labels),
            id_column=opts.id_column, label_column=opts.label_column,
            group_column=opts.group_column, onehot_columns=opts.onehot_columns,
            onehot_zero_class=opts.onehot_zero_class, split_column=opts.split_column,
            splits_from=None if opts.splits_from is None else Path(opts.splits_from),
            model=parent, val=opts.val, test=opts.test, seed=opts.seed,
            max_per_class=opts.max_per_class, workers=opts.workers,
            train_anomalies=opts.train_anomalies, **policy.to_dict()))
        work.echo(format_summary(summary))
    counts = split_counts(work.data)
    check_usable(counts, work.data)
    return {"counts": counts}


def split_counts(prepared: Path) -> dict[str, dict[str, int]]:
    """split -> class -> images, from a prepared folder's manifest.csv (label 0 = normal is
    kept in the class name's entry; see normal_classes)."""
    return PreparedDataset.open(prepared).counts()


def normal_classes(prepared: Path) -> list[str]:
    return PreparedDataset.open(prepared).normal_classes()


def check_usable(counts: dict[str, dict[str, int]], prepared: Path) -> None:
    """Refuse, in one sentence, a collection that cannot be adapted to: normals are needed in
    train (the bank) and val (the choice), and anomalies in val."""
    normals = set(normal_classes(prepared))
    for split, why in (("train", "the bank of normal images"),
                       ("val", "the choice of the configuration")):
        n = sum(v for c, v in counts.get(split, {}).items() if c in normals)
        if n == 0:
            raise UserError(f"The collection has no normal images in its {split} split, which "
                            f"adapt needs for {why}; give a split with normals in train and "
                            f"val (--split-column, or the seeded split's --val/--test).")
    anomalies = sum(v for c, v in counts.get("val", {}).items() if c not in normals)
    if anomalies == 0:
        raise UserError("The collection has no anomalies in its val split, so no configuration "
                        "can be chosen; put some anomalous images in val.")


# ------------------------------------------------------------------------------ steps 2-3: train


def _budget(opts: AdaptOptions, work: _Work, *, training: str) -> float | None:
    """Minutes the training step `training` ('gan' | 'encoder') may take under --minutes: what
    is left after the estimated remaining fixed steps, shared with the other training step in
    proportion to its estimated cost (at least one minute)."""
    if work.deadline is None:
        return None
    left = work.deadline - time.time() - _fixed_estimate(opts, work)
    scale = _pixels(work) / 64 ** 2
    gan = opts.kimg * SECONDS_PER_GAN_KIMG * scale if not work.done("gan") else 0.0
    enc = opts.encoder_kimg * SECONDS_PER_ENCODER_KIMG * scale
    share = (gan if training == "gan" else enc) / max(gan + enc, 1e-9)
    return max(1.0, left * share / 60)


def _pixels(work: _Work) -> int:
    from anodata.policy import read_prepared_policy

    policy = read_prepared_policy(work.data)
    return 64 ** 2 if policy is None else policy.resolution ** 2


def _fixed_estimate(opts: AdaptOptions, work: _Work) -> float:
    """Seconds the tune, assemble and test steps should take (rough: SECONDS_PER_VIEW)."""
    counts = work.state["steps"].get("prepare", {}).get("counts", {})
    n = {split: sum(per.values()) for split, per in counts.items()}
    per_view = SECONDS_PER_VIEW * _pixels(work) / 64 ** 2
    tune = (n.get("val", 0) * 9 + min(n.get("train", 0), opts.bank_size)) * per_view
    test = 0.0
    if opts.read_test and n.get("test", 0):
        test = (n.get("val", 0) + n["test"]) * 2 * per_view + SECONDS_FOR_EVALUATE
    return tune + test


def _parent_training_cfg(parent: Path) -> str:
    try:
        return str(json.loads((parent / "training_options.json").read_text())["cfg"])
    except (OSError, ValueError, KeyError, TypeError):
        return "auto"


def _step_gan(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    if opts.kimg == 0:
        work.echo(f"{label}: kept the parent's network (--kimg 0)")
        return {"network": str(parent / "network.safetensors"), "trained": False}
    from stylegan.options import TrainFlags, run_from_flags
    from stylegan.train import find_latest_snapshot

    outdir = work.root / "gan"
    resume = str(parent / "network.safetensors")
    if outdir.is_dir() and list(outdir.rglob("network-snapshot-*.safetensors")):
        resume = "latest"  # a killed run continues from its last snapshot
    minutes = _budget(opts, work, training="gan")
    estimate = opts.kimg * SECONDS_PER_GAN_KIMG * _pixels(work) / 64 ** 2
    work.echo(f"{label}: fine-tuning the parent's GAN for {opts.kimg:g} kimg on the training "
              f"normals (about {_duration(estimate)}"
              + (f"; at most {minutes:.1f} min of the --minutes budget)" if minutes else ")"))
    run_from_flags(TrainFlags(
        outdir=str(outdir), data=str(work.data / "train.zip"), cfg=_parent_training_cfg(parent),
        kimg=opts.kimg, tick=max(opts.kimg / 20, 0.004), snap=1, workers=1, resume=resume,
        mirror=True, rot90=True, seed=opts.seed, device=opts.device, max_minutes=minutes),
        echo=work.echo)
    return {"network": str(find_latest_snapshot(outdir)), "trained": True,
            "budget_minutes": minutes}


def _step_encoder(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    network = work.state["steps"]["gan"]["network"]
    if opts.encoder_kimg == 0:
        work.echo(f"{label}: kept the parent's encoder (--encoder-kimg 0)")
        return {"encoder": str(parent / "encoder.safetensors"), "trained": False}
    from anomaly.model.encoder_io import best_encoder, encoder_checkpoints
    from anomaly.model.fit import FitOptions, fit_encoder
    from anomaly.model.ano_model import AnoModel

    outdir = work.root / "encoder"
    started = outdir.is_dir() and encoder_checkpoints(outdir)
    parent_model = AnoModel.load(str(parent / "network.safetensors"),
                                 str(parent / "encoder.safetensors"), device="cpu",
                                 require_D=False)
    minutes = _budget(opts, work, training="encoder")
    estimate = opts.encoder_kimg * SECONDS_PER_ENCODER_KIMG * _pixels(work) / 64 ** 2
    work.echo(f"{label}: training the encoder from the parent's for {opts.encoder_kimg:g} kimg "
              f"on the training normals, checkpoint chosen on the validation normals (about "
              f"{_duration(estimate)}"
              + (f"; at most {minutes:.1f} min of the --minutes budget)" if minutes else ")"))
    last = fit_encoder(FitOptions(
        network=network, data=str(work.data / "train.zip"), outdir=str(outdir),
        kimg=opts.encoder_kimg, kappa=parent_model.kappa,
        feature_layer=parent_model.feature_layer, resume="latest" if started else None,
        init=None if started else str(parent / "encoder.safetensors"), seed=opts.seed,
        workers=1, device=opts.device, mirror=True, rot90=True,
        val=str(work.data / "val.zip"), max_minutes=minutes), echo=work.echo)
    chosen = best_encoder(outdir) or last
    return {"encoder": str(chosen), "trained": True, "budget_minutes": minutes}


# ------------------------------------------------------------------------------ step 4: tune


def tuning_rule(opts: AdaptOptions, prepared: Path) -> tuple[dict[str, Any], list[str]]:
    """The tune options the validation split can support, and a note for each fallback.

    - fewer than MIN_ANOMALIES anomalies or normals of the comparison in val: the parent's
      own configuration, re-fitted (bank, threshold, reference scores), no choice;
    - fewer than FEW_ANOMALIES: the grid without TTA and without rank averages;
    - worst:COLUMN with fewer than two values of COLUMN holding `min_subgroup` validation
      normals: the plain validation AUC.
    """
    val = PreparedDataset.open(prepared).rows("val")
    normals = val["label"] == 0
    if opts.anomaly_class in (None, "all"):
        target = val["class"] == "mel" if (opts.anomaly_class is None
                                           and (val["class"] == "mel").any()) else ~normals
    else:
        target = val["class"] == opts.anomaly_class
    n_normal, n_anomaly = int(normals.sum()), int(target.sum())
    rule: dict[str, Any] = {"grid": opts.grid, "select": opts.select, "tta": "both",
                            "combine": 3}
    notes = []
    if min(n_normal, n_anomaly) < MIN_ANOMALIES:
        rule.update(grid=_parent_method_grid(Path(opts.model)), select="auc", tta=_parent_tta(
            Path(opts.model)), combine=0)
        notes.append(f"the validation split holds {n_normal} normals and {n_anomaly} anomalies "
                     f"of the comparison (fewer than {MIN_ANOMALIES}): too few to choose among "
                     f"configurations, so the parent's configuration ({rule['grid']}) is kept "
                     f"and only its bank, threshold and reference scores are fitted here")
        return rule, notes
    if n_anomaly < FEW_ANOMALIES:
        rule.update(tta="off", combine=0)
        notes.append(f"the validation split holds {n_anomaly} anomalies of the comparison "
                     f"(fewer than {FEW_ANOMALIES}): the grid is tried without TTA and without "
                     f"rank averages, so that fewer candidates compete on a noisy AUC")
    base = opts.select.split("+")[0]
    if base.startswith("worst:"):
        column = base[6:]
        if column in val.columns:
            counts = val.loc[normals, column].value_counts()
            if int((counts >= opts.min_subgroup).sum()) < 2:
                rule["select"] = opts.select.replace(base, "auc", 1)
                notes.append(f"--select {opts.select}: fewer than two values of {column} have "
                             f"{opts.min_subgroup} validation normals, so the rule is "
                             f"{rule['select']}")
    return rule, notes


def _parent_detector(parent: Path) -> dict | None:
    path = parent / "detector.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except ValueError:
        raise UserError(f"{path} is not valid JSON; the parent model folder is damaged.") \
            from None


def _parent_method_grid(parent: Path) -> str:
    """The parent detector's methods as a grid (its components), or the plain L1 residual."""
    det = _parent_detector(parent)
    if not det:
        return "sklearn:manhattan"
    methods = [c["method"] for c in det.get("configuration") or []] or [det["method"]]
    return ",".join(dict.fromkeys(methods))


def _parent_tta(parent: Path) -> str:
    det = _parent_detector(parent)
    comps = (det or {}).get("configuration") or []
    return "on" if any(c.get("tta") for c in comps) else "off"


def _step_tune(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    from anomaly.scoring.tune import TuneOptions, tune

    rule, notes = tuning_rule(opts, work.data)
    for note in notes:
        work.echo(f"{label}: note: {note}")
    counts = work.state["steps"]["prepare"]["counts"]
    n_val = sum(counts.get("val", {}).values())
    views = 9 if rule["tta"] == "both" else (8 if rule["tta"] == "on" else 1)
    estimate = (n_val * views + min(sum(counts.get("train", {}).values()), opts.bank_size)) \
        * SECONDS_PER_VIEW * _pixels(work) / 64 ** 2
    work.echo(f"{label}: choosing the configuration on {n_val} validation images "
              f"(--select {rule['select']}; about {_duration(estimate)})")
    outdir = work.root / "tune"
    written = tune(TuneOptions(
        data=str(work.data / "val.zip"), outdir=str(outdir), train=str(work.data / "train.zip"),
        network=work.state["steps"]["gan"]["network"],
        encoder=work.state["steps"]["encoder"]["encoder"], grid=rule["grid"], tta=rule["tta"],
        normal_class=opts.normal_class, anomaly_class=opts.anomaly_class,
        select=rule["select"], tolerance=opts.tolerance, by=opts.by,
        min_subgroup=opts.min_subgroup, threshold=opts.threshold, combine=rule["combine"],
        bootstrap=opts.bootstrap, seed=opts.seed, bank_size=opts.bank_size, batch=opts.batch,
        device=opts.device))
    chosen = json.loads(Path(written["detector"]).read_text())
    work.echo(f"{label}: chosen {chosen['method']} ({chosen['comparison']}; validation "
              f"{chosen['selection']['rule']} {chosen['selection']['value']:.3f}, AUC "
              f"{chosen['val_auc']:.3f} [{chosen['val_auc_ci'][0]:.3f}, "
              f"{chosen['val_auc_ci'][1]:.3f}])")
    return {"outdir": str(outdir), "rule": rule, "notes": notes, "method": chosen["method"]}


# ------------------------------------------------------------------------------ step 5: assemble


def _step_assemble(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    steps = work.state["steps"]
    model_dir = work.root / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging = work.root / "model.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    tuned = Path(steps["tune"]["outdir"])
    shutil.copyfile(steps["gan"]["network"], staging / "network.safetensors")
    shutil.copyfile(steps["encoder"]["encoder"], staging / "encoder.safetensors")
    for name in ("detector.json", "bank.safetensors", "tune.xlsx"):
        if (tuned / name).is_file():
            shutil.copyfile(tuned / name, staging / name)
    if steps["encoder"]["trained"]:  # the encoder's run record, as the shipped model has it
        for name, kept in (("validation.json", "encoder_validation.json"),
                           ("encoder_options.json", "encoder_options.json")):
            if (work.root / "encoder" / name).is_file():
                shutil.copyfile(work.root / "encoder" / name, staging / kept)
    PreparedDataset.open(work.data).lesion_groups().to_csv(staging / "splits.csv", index=False)
    staging.rename(model_dir)
    work.echo(f"{label}: network, encoder, detector.json, bank, splits.csv, tune.xlsx")
    return {}


# ------------------------------------------------------------------------------ step 6: test


def _step_test(opts: AdaptOptions, parent: Path, work: _Work, label: str) -> dict:
    counts = work.state["steps"]["prepare"]["counts"]
    normals = set(normal_classes(work.data))
    test = counts.get("test", {})
    n_norm = sum(v for c, v in test.items() if c in normals)
    n_anom = sum(v for c, v in test.items() if c not in normals)
    if not opts.read_test:
        work.echo(f"{label}: skipped (--no-test)")
        return {"read": False, "why": "--no-test"}
    if n_norm == 0 or n_anom == 0:
        work.echo(f"{label}: skipped (the test split holds {n_norm} normals and {n_anom} "
                  f"anomalies)")
        return {"read": False, "why": f"the test split holds {n_norm} normals and {n_anom} "
                                      f"anomalies"}
    from anomaly.evaluation.evaluate import EvaluateOptions, evaluate_scores
    from anomaly.scoring.score import ScoreOptions, score_datasets

    model_dir = work.root / "model"
    evaluation = model_dir / "evaluation"
    if evaluation.exists():  # a killed earlier attempt: start the reading again
        shutil.rmtree(evaluation)
    estimate = ((sum(counts.get("val", {}).values()) + n_norm + n_anom) * 2 * SECONDS_PER_VIEW
                * _pixels(work) / 64 ** 2 + SECONDS_FOR_EVALUATE)
    work.echo(f"{label}: reading the test split once ({n_norm} normals, {n_anom} anomalies; "
              f"about {_duration(estimate)})")
    score_datasets(ScoreOptions(
        network=str(model_dir / "network.safetensors"),
        encoder=str(model_dir / "encoder.safetensors"),
        data=(str(work.data / "val.zip"), str(work.data / "test.zip")),
        outdir=str(evaluation / "scores"), detector=str(model_dir / "detector.json"),
        batch=opts.batch, device=opts.device))
    summary = evaluate_scores(EvaluateOptions(
        scores_dir=evaluation / "scores", outdir=evaluation, prepared=work.data,
        primary="detector", normal_class=opts.normal_class, anomaly_class=opts.anomaly_class,
        bootstrap=opts.bootstrap, seed=opts.seed))
    return {"read": True, "result": _test_result(summary)}


def _test_result(summary) -> dict:
    """The primary detector's main-comparison row (and the best baseline's) as plain numbers."""
    table = summary.table
    out: dict[str, Any] = {}
    for key, method in (("detector", summary.primary), ("baseline", summary.best_baseline)):
        if method is None:
            continue
        rows = table[table["method"] == method]
        if rows.empty:
            continue
        row = rows.iloc[0]  # the main comparison comes first
        out[key] = {"method": method, "comparison": str(row.get("comparison", "")),
                    "auc": _number(row.get("auc")), "auc_low": _number(row.get("auc_ci_low")),
                    "auc_high": _number(row.get("auc_ci_high")),
                    "n_normal": _number(row.get("n_normal")),
                    "n_anomaly": _number(row.get("n_anomaly"))}
        if key == "detector":
            out[key].update({"vs_baseline": row.get("vs_baseline") or None,
                             "auc_diff": _number(row.get("auc_diff")),
                             "auc_diff_low": _number(row.get("auc_diff_ci_low")),
                             "auc_diff_high": _number(row.get("auc_diff_ci_high")),
                             "p_value": _number(row.get("p_value"))})
    return out


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------ the model card


def _write_card(opts: AdaptOptions, parent: Path, work: _Work, model_dir: Path) -> None:
    from anomaly.evaluation.model_card import adapt_card

    steps = work.state["steps"]
    record = {"options": dataclasses.asdict(opts), "command": work.state.get("command"),
              "parent": {"folder": str(parent),
                         "network_sha256": sha256_file(parent / "network.safetensors"),
                         "encoder_sha256": sha256_file(parent / "encoder.safetensors")},
              "steps": steps}
    atomic_write_json(model_dir / "adapt.json", record)
    tune_table = pd.read_excel(model_dir / "tune.xlsx") if (model_dir / "tune.xlsx").is_file() \
        else pd.DataFrame()
    (model_dir / "README.md").write_text(adapt_card(record, tune_table), encoding="utf-8")

"""`anostyle tune`: choose the scoring configuration on the VALIDATION split only.

One pass over the training naevi (a seeded subset of at most `bank_size` images; E and D, and G
too for the izif-areafree trends) fits the bank; one pass over val.zip computes each image's raw quantities for the plain image
and the mean over the 8 TTA views (anomaly.methods.detector.extract); every configuration of the
grid (method x TTA) is then evaluated from that cache, so a grid of dozens of configurations costs
about one scoring pass. test.zip is never opened.

Per configuration (tune.xlsx, one row each): validation AUC of the main comparison (normal vs
the anomaly class, or vs all anomalies) with a lesion-level bootstrap CI
(anomaly.evaluation.metrics.bootstrap_cis, groups = the manifest's `group`), the AUC of each
subgroup of NORMALS by every `by` column (that subgroup's normals vs all anomalies of the
comparison), and n. Selection rule: 'auc' (the main AUC) or 'worst:COLUMN' (the minimum subgroup AUC
over the values of COLUMN with at least `min_subgroup` normals; it guards against scores that only
separate one acquisition route of the normals), either with '+shifts' (e.g. 'worst:dx_type+shifts'):
the selection value becomes min(that value, the main AUC under each simulated acquisition shift of
`shifts`, anodata/shifts.py). A shift is applied to a seeded half (SHIFT_SHARE, `seed`) of the
normals and, independently, of the anomalies of the comparison: their RAW images (the manifest's
`source` under `images`, by default the source folder prepare.json records) are decoded, shifted
and fitted with the model's policy, and one more cached pass over those images replaces their
raw quantities; the other half keeps its own. It rewards scores that keep their AUC when the
framing, exposure or dermoscope changes, which one collection's routes alone cannot show.
Then rank averages of pairs of the `combine` best single
configurations are evaluated too, each pair followed by its one-pass counterpart (both
components without TTA). Choice (the "simplest within tolerance" rule, fixed before any
test figure is read): among the rows whose selection value is within `tolerance` of the best,
the cheapest wins: fewest forward passes per image (1 without TTA, 8 with), then fewest
components, then the highest selection value, then grid order. A TTA view or a second score is
only paid for when it is worth more than `tolerance` on validation. That row becomes
detector.json with its threshold chosen on validation.

`sklearn:euclidean` is left out of the default grid: it is a monotone function of
`residual:mean` (the square root of 3 x 64 x 64 times it), so the two rank images identically.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from stylegan.progress import progress

from anodata.shifts import DEFAULT_SHIFTS, Shift, parse_shifts, shifted_halves
from anomaly.methods import detector as det
from anomaly.methods import detector_scores as ds
from anomaly.methods import registry
from anomaly.evaluation import metrics, protocol
from anomaly.model.ano_model import AnoModel
from anomaly.evaluation.protocol import Comparison
from anomaly.evaluation.sheets import config_dict, write_frames
from stylegan.dataset import ImageDataset, iterate_batches
from stylegan.errors import UserError
from stylegan.fileio import (atomic_write_json, check_own_folder, output_folder, path_from,
                             sha256_file)

DEFAULT_GRID = ("residual:mean,residual:p99,residual:smax:1,residual:smax:2,residual:smax:4,"
                "lesion:mean,lesion:edge,lesion:ratio,"
                "izif:0.1,izif:1,izif:10,izif-areafree:0.1,izif-areafree:1,izif-areafree:10,"
                "dfeat-res:b8,dfeat-res:b16,dfeat-res:b32,"
                "dfeat-res:b8+b16+b32,knn-latent:1,knn-latent:5,knn-latent:20,maha-latent,"
                "knn-dfeat:b8:5,knn-dfeat:b16:5,knn-dfeat:b32:5,knn-dfeat:b8:20,"
                "maha-dfeat:b8,maha-dfeat:b16,maha-dfeat:b32,sklearn:cosine,sklearn:manhattan")
BANK_LIMIT_BYTES = 1_000_000
OUTPUT_FILES = ("tune.xlsx", "tune.json", "detector.json", "bank.safetensors")
SHIFT_SHARE = 0.5  # share of the normals and of the anomalies each shift is applied to


@dataclass(frozen=True)
class TuneOptions:
    """Options of `anostyle tune` (saved as tune.json beside tune.xlsx)."""

    data: str  # val.zip (validation split only)
    outdir: str
    network: str | None = None
    encoder: str | None = None
    model: str | None = None  # a model folder (network.safetensors + encoder.safetensors)
    train: str | None = None  # train.zip for the bank [beside --data]
    grid: str = DEFAULT_GRID  # methods, comma-separated (anomaly.methods.registry names)
    tta: str = "both"  # 'off' | 'on' | 'both': configurations without / with TTA
    normal_class: str | None = None  # None: the class labelled 0
    anomaly_class: str | None = None  # None: 'mel' when present, else all; 'all': all
    select: str = "auc"  # 'auc' | 'worst:COLUMN', either + '+shifts'
    shifts: str = DEFAULT_SHIFTS  # simulated shifts of '+shifts' (anodata/shifts.py grammar)
    images: str | None = None  # raw images of '+shifts' [the source folder in prepare.json]
    tolerance: float = 0.01  # the cheapest row within this of the best selection value wins
    by: tuple[str, ...] = ()  # manifest columns for subgroup AUCs (the select column is added)
    min_subgroup: int = 20  # smallest subgroup of normals in the worst-case rule
    threshold: str = "youden"  # 'youden' | 'p95' | a number
    combine: int = 3  # rank-average pairs of the N best single configurations (0: none)
    bootstrap: int = 500
    seed: int = 0
    bank_size: int = 2000  # training naevi in the bank (seeded subset)
    dims: int = 64  # PCA dimensions of each learned space
    batch: int = 64
    device: str = "auto"
    allow_mismatch: bool = False  # accept an encoder trained for another network (noted)


@dataclass
class ValCache:
    """The validation rows and their raw quantities per mode ('plain', 'tta')."""

    rows: pd.DataFrame  # file, class, label, group, image, manifest columns
    q: dict[str, dict[str, torch.Tensor]]


def tune(opts: TuneOptions) -> dict[str, Path]:
    """Run the grid on validation data; write tune.xlsx, tune.json, detector.json, bank."""
    data, train = _checked_paths(opts)
    check_own_folder(opts.outdir, OUTPUT_FILES)  # before the passes, not after
    if opts.model is None and opts.network and not opts.encoder:  # D-only grids need no E
        network, encoder = opts.network, None
    else:
        network, encoder, _ = det.resolve_model_dir(opts.model, opts.network, opts.encoder)
    model = AnoModel.load(network, encoder, device=opts.device, require_D=False,
                          allow_mismatch=opts.allow_mismatch)
    for path in (data, train):
        det.check_data_policy(model, path)
    configs = _grid(opts)
    shifts = _shifts(opts)
    if shifts:  # refused before the passes, not after
        raw_paths(data, None, opts.images)
    needs = det.needs_of(sorted({m for m, _t in configs}), model)
    if encoder is None and (needs.latent or needs.rec):
        raise UserError("--encoder is missing, and the --grid holds methods that need it; give "
                        "--encoder (or --model DIR), or only knn-dfeat/maha-dfeat methods.")
    modes = _modes(opts)
    start = time.time()
    bank = det.bank_from_zip(model, train, needs, modes=modes, bank_size=opts.bank_size,
                             dims=opts.dims, seed=opts.seed, batch=opts.batch)
    cache = _val_pass(model, data, needs, tta="tta" in modes, batch=opts.batch)
    comparison = _comparison(cache.rows, opts)
    shifted = np.zeros(len(cache.rows), dtype=bool)
    shift_q = {}
    if shifts:
        shifted = _shifted_rows(cache.rows, comparison, opts.seed)
        shift_q = shift_passes(model, data, cache, shifted, shifts, needs, tta="tta" in modes,
                               images=opts.images, batch=opts.batch)
    seconds = time.time() - start
    by = tuple(dict.fromkeys((*opts.by, *_select_column(opts))))
    _check_columns(cache.rows, by)
    dropped = {c: small_subgroups(cache.rows, comparison.normal, c, opts.min_subgroup)
               for c in _select_column(opts)}
    for column, small in dropped.items():
        if small:  # the worst-case guard cannot see these routes: say so, never silently
            warnings.warn(f"--select worst:{column}: the subgroups {', '.join(small)} have fewer "
                          f"than {opts.min_subgroup} validation normals and are not counted; "
                          f"the rule guards only the others (lower --min-subgroup, or "
                          f"validate on more images)", UserWarning, stacklevel=2)
    scores = _scores(configs, cache.q, bank, model)
    under = {name: _scores(configs, q, bank, model) for name, q in shift_q.items()}
    for q_scores in (scores, *under.values()):
        ds.refuse_non_finite(q_scores, command="tune", outputs="tune.xlsx or detector.json")
    rows = [_evaluate(name, s, cache.rows, comparison, by, opts,
                      shifted={sh: under[sh][name] for sh in under})
            for name, s in scores.items()]
    rows += _combinations(rows, scores, cache.rows, comparison, by, opts, under)
    table = pd.DataFrame(rows)
    table = _with_cost(table)
    best = select_row(table, opts.tolerance)
    table["chosen"] = table.index == best.name
    detector = _detector(best, float(table["select"].max()), scores, cache.rows, comparison,
                         model, opts, bank_images=min(opts.bank_size, len(ImageDataset(train))),
                         shifts=_shift_record(shifts, shifted, cache.rows, comparison.normal,
                                              opts))
    outdir = Path(opts.outdir)
    options = provenance(opts, outdir)
    detector = replace(detector, extra={**detector.extra, "tune": options})
    with output_folder(outdir, owned=OUTPUT_FILES) as unit:
        written = _write_outputs(unit, table, detector, bank, {
            "options": options, "network": options["network"], "encoder": options["encoder"],
            "configurations": len(table), "chosen": detector.method,
            "comparison": comparison.name, "selection": detector.selection, "validation_images": len(cache.rows),
            "subgroups_not_counted": dropped, "seconds_for_passes": round(seconds, 2)})
    return {key: outdir / path.name for key, path in written.items()}


def _write_outputs(unit: Path, table: pd.DataFrame, detector: det.Detector, bank: det.Bank,
                   record: dict) -> dict[str, Path]:
    """tune.xlsx, the bank (with its sha256 in detector.json), detector.json and tune.json into
    the folder `unit` that `output_folder` then moves into place."""
    written = {"table": write_frames({"tune": _ordered(table)}, unit / "tune.xlsx",
                                     float_format="0.0000")}
    if detector.bank:
        needed = [(c.method, c.tta) for c in detector.components]
        written["bank"] = bank.subset(needed).save(unit / detector.bank)
        if written["bank"].stat().st_size > BANK_LIMIT_BYTES:
            raise UserError(f"The bank of {len(detector.components)} configuration(s) is larger "
                            f"than 1 MB; lower --bank-size or --dims.")
        detector = replace(detector, bank_sha256=sha256_file(written["bank"]))
    written["detector"] = detector.save(unit / "detector.json")
    atomic_write_json(unit / "tune.json", record)
    written["config"] = unit / "tune.json"
    return written


PATH_OPTIONS = ("data", "network", "encoder", "model", "train")


def provenance(opts: TuneOptions, outdir: Path) -> dict:
    """The options as recorded in detector.json and tune.json: input paths relative to the
    output folder (no machine's absolute folders in a shipped file), outdir as '.', and the
    sha256 of val.zip and train.zip (the networks' are detector.json's own fields)."""
    record = config_dict(opts)
    for key in PATH_OPTIONS:
        if record.get(key):
            record[key] = path_from(outdir, record[key])
    train = Path(opts.train) if opts.train else Path(opts.data).with_name("train.zip")
    record.update(outdir=".", train=path_from(outdir, train),
                  data_sha256=sha256_file(opts.data), train_sha256=sha256_file(train))
    return record


# ------------------------------------------------------------------------------ inputs


def small_subgroups(rows: pd.DataFrame, normal: str, column: str, minimum: int) -> list[str]:
    """Values of `column` whose normals number fewer than `minimum` (sorted, with counts)."""
    y = (rows["class"] != normal).to_numpy().astype(np.int64)
    return protocol.small_subgroups(protocol.subgroups(_text_values(rows, column), y,
                                                       minimum=minimum))


def _text_values(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Each row's value of `column` as text ('' for an empty cell): tune's subgroup labels."""
    return rows[column].fillna("").astype(str).to_numpy()


def _checked_paths(opts: TuneOptions) -> tuple[Path, Path]:
    """(val.zip, train.zip); anything that looks like the test split is refused."""
    data = Path(opts.data)
    if data.stem == "test" or "test" in data.name.lower():
        raise UserError(f"--data {data} looks like the test split; tune reads validation data "
                        f"only (val.zip): test is read once, afterwards, by `anostyle evaluate`.")
    if not data.is_file():
        raise UserError(f"--data {data} does not exist; give the val.zip of `anostyle prepare`.")
    train = Path(opts.train) if opts.train else data.with_name("train.zip")
    if not train.is_file():
        raise UserError(f"--train {train} does not exist; give the train.zip the model was "
                        f"trained on (its naevi form the bank).")
    if train.stem == "test":
        raise UserError(f"--train {train} is the test split; give train.zip.")
    if opts.tta not in ("off", "on", "both"):
        raise UserError(f"--tta {opts.tta!r} must be off, on or both.")
    return data, train


def _modes(opts: TuneOptions) -> tuple[str, ...]:
    return {"off": ("plain",), "on": ("tta",), "both": ("plain", "tta")}[opts.tta]


def _grid(opts: TuneOptions) -> list[tuple[str, bool]]:
    methods = list(dict.fromkeys(m.strip().lower() for m in opts.grid.split(",") if m.strip()))
    if not methods:
        raise UserError("--grid is empty; give methods such as residual:p99,knn-latent:5.")
    for m in methods:
        registry.parse(m, where="--grid")
    return [(m, mode == "tta") for m in methods for mode in _modes(opts)]


def _val_pass(model: AnoModel, data: Path, needs: det.Needs, *, tta: bool,
              batch: int) -> ValCache:
    from anomaly.scoring.score import _open_dataset

    dataset, rows = _open_dataset(str(data))
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    records = []
    for images, labels, names in progress(iterate_batches(dataset, batch), desc="val",
                                          total=-(-len(dataset) // batch)):
        q = det.extract(model, images, needs, tta=tta)
        q.pop("forward", None)
        for mode, values in q.items():
            for key, v in values.items():
                parts.setdefault(mode, {}).setdefault(key, []).append(v)
        classes, _splits, meta = rows.describe(names, labels.tolist())
        records += [{"file": n, "class": c, "label": int(lab != 0), **m}
                    for n, c, lab, m in zip(names, classes, labels.tolist(), meta)]
    q = {mode: {k: torch.cat(v) for k, v in values.items()} for mode, values in parts.items()}
    return ValCache(pd.DataFrame(records), q)


def _shifted_rows(rows: pd.DataFrame, comparison: Comparison, seed: int) -> np.ndarray:
    """Bool [N]: the seeded SHIFT_SHARE of the comparison's normals and of its anomalies."""
    compared = np.flatnonzero(comparison.mask(rows))
    out = np.zeros(len(rows), dtype=bool)
    out[compared] = shifted_halves(comparison.labels(rows).astype(bool), SHIFT_SHARE, seed)
    return out


def raw_paths(data: Path, files: list[str] | None, images: str | None) -> list[Path]:
    """The raw source file of each prepared file of the split (None: all of them): manifest
    `source` under `images`, by default the source folder prepare.json records; refuses in one
    sentence when one is missing."""
    from anodata.prepared import PreparedDataset, split_of_zip

    prepared = PreparedDataset.open(data)
    rows = prepared.rows(split_of_zip(data))  # as scoring reads it
    source = dict(zip(rows["file"], rows.get("source", pd.Series("", index=rows.index))))
    files = list(source) if files is None else files
    if images is None:
        images = prepared.source_folder
    paths = [Path(images or ".") / source.get(f, "") for f in files]
    missing = [f for f, p in zip(files, paths) if not source.get(f) or not p.is_file()]
    if images is None or missing:
        example = missing[0] if missing else (files[0] if files else "its files")
        raise UserError(f"The raw images of {data} that --select +shifts needs are not found "
                        f"({len(missing) or len(files)} missing, e.g. the source of {example} "
                        f"under {images or 'the source folder prepare.json records'}); give "
                        f"--images, the folder the data were prepared from.")
    return paths


def shift_passes(model: AnoModel, data: Path, cache: ValCache, shifted: np.ndarray,
                 shifts: tuple[Shift, ...], needs: det.Needs, *, tta: bool,
                 images: str | None, batch: int) -> dict[str, dict[str, dict]]:
    """{shift name: raw quantities per mode (as cache.q)}: the `shifted` rows' raw images are
    decoded, shifted, fitted with the model's policy and passed once; the others keep theirs."""
    from stylegan.imageio import decode
    from anodata.policy import fit_image

    idx = np.flatnonzero(shifted)
    paths = raw_paths(data, cache.rows["file"].iloc[idx].tolist(), images)
    policy = model.policy
    out = {}
    for shift in shifts:
        # prepare decodes JPEGs at a reduced draft size (box filter); a zoom in by F needs F
        # times the pixels so that it enlarges what prepare would have seen
        zoom_in = shift.value if shift.kind == "zoom" and shift.value > 1 else 1.0
        draft = math.ceil(policy.resolution * zoom_in) if policy.resize_filter == "box" else None
        parts: dict[str, dict[str, list[torch.Tensor]]] = {}
        for i in progress(range(0, len(paths), batch), desc=shift.name):
            fitted = []
            for p in paths[i:i + batch]:
                img = decode(p.read_bytes(), suffix=p.suffix, channels=policy.channels,
                             draft_size=draft)
                a = np.asarray(fit_image(shift.apply(img), policy), dtype=np.uint8)
                fitted.append(a.reshape(a.shape[0], a.shape[1], -1).transpose(2, 0, 1))
            q = det.extract(model, torch.from_numpy(np.stack(fitted)), needs, tta=tta)
            q.pop("forward", None)
            for mode, values in q.items():
                for key, v in values.items():
                    parts.setdefault(mode, {}).setdefault(key, []).append(v)
        out[shift.name] = {}
        for mode, values in cache.q.items():
            out[shift.name][mode] = {}
            for key, v in values.items():
                v = v.clone()
                v[torch.from_numpy(idx)] = torch.cat(parts[mode][key]).to(v.dtype)
                out[shift.name][mode][key] = v
    return out


def _shift_record(shifts: tuple[Shift, ...], shifted: np.ndarray, rows: pd.DataFrame,
                  normal: str, opts: TuneOptions) -> dict | None:
    if not shifts:
        return None
    normals = (rows["class"] == normal).to_numpy()
    return {"shifts": [s.name for s in shifts], "share": SHIFT_SHARE, "seed": opts.seed,
            "shifted_normals": int((shifted & normals).sum()),
            "shifted_anomalies": int((shifted & ~normals).sum())}


def _comparison(rows: pd.DataFrame, opts: TuneOptions) -> Comparison:
    """The main comparison of the validation rows (anomaly.evaluation.protocol)."""
    normal = protocol.resolve_normal_class([rows], opts.normal_class,
                                           where="the validation data")
    if not (rows["class"] != normal).any():
        raise UserError("The validation data hold no anomalies, so nothing can be tuned; "
                        "prepare val.zip with the anomaly classes.")
    comparison = protocol.build_comparisons(rows, normal, opts.anomaly_class,
                                            where="validation images")[0]
    if opts.anomaly_class is None and protocol.is_pooled(comparison):
        # the default, named in tune.json, detector.json and the chosen line
        warnings.warn(f"--anomaly-class is not given and the validation data hold no "
                      f"'{protocol.DEFAULT_ANOMALY_CLASS}': the comparison is {normal} vs all of "
                      f"{', '.join(sorted(comparison.anomalies))}", UserWarning, stacklevel=3)
    return comparison


def parse_select(text: str) -> tuple[str | None, bool]:
    """(worst-case column or None for 'auc', with shifts) of a selection rule such as
    'auc', 'worst:dx_type' or 'worst:dx_type+shifts'."""
    rule = text.strip()
    with_shifts = rule.endswith("+shifts")
    base = rule[:-len("+shifts")] if with_shifts else rule
    if base == "auc":
        return None, with_shifts
    column = base[6:].strip() if base.startswith("worst:") else ""
    if column and "+" not in column:
        return column, with_shifts
    raise UserError(f"--select {text!r} is not understood; use auc or worst:COLUMN, either "
                    f"optionally followed by +shifts (e.g. worst:dx_type+shifts).")


def _select_column(opts: TuneOptions) -> tuple[str, ...]:
    column = parse_select(opts.select)[0]
    return () if column is None else (column,)


def _shifts(opts: TuneOptions) -> tuple[Shift, ...]:
    """The simulated shifts of a '+shifts' rule (none otherwise)."""
    if not parse_select(opts.select)[1]:
        return ()
    try:
        return parse_shifts(opts.shifts)
    except ValueError as exc:
        raise UserError(f"--shifts: {exc}.") from None


def _check_columns(rows: pd.DataFrame, by: tuple[str, ...]) -> None:
    for column in by:
        if column not in rows.columns:
            extra = [c for c in rows.columns if c not in ("file", "class", "label")]
            raise UserError(f"The column {column!r} is not in the manifest of the validation "
                            f"data (columns: {', '.join(extra) or 'none'}); select or group by "
                            f"one of these, or prepare the data with a metadata CSV that has it.")


# ------------------------------------------------------------------------------ evaluation


def _scores(configs: list[tuple[str, bool]], q: dict, bank, model: AnoModel
            ) -> dict[str, np.ndarray]:
    """{configuration name: scores [N]} from the raw quantities of one pass."""
    return {det.config_name(m, t): det.method_scores(
        m, q["tta" if t else "plain"], mode="tta" if t else "plain", bank=bank,
        model_layer=model.feature_layer) for m, t in configs}


def selection_value(route_value: float, shift_aucs: dict[str, float]) -> float:
    """min(the route rule's value, the AUC under each shift); NaN when any is NaN."""
    values = [route_value, *shift_aucs.values()]
    return math.nan if any(not math.isfinite(v) for v in values) else min(values)


def _evaluate(name: str, s: np.ndarray, rows: pd.DataFrame, comparison: Comparison,
              by: tuple[str, ...], opts: TuneOptions, *,
              shifted: dict[str, np.ndarray] | None = None) -> dict:
    """One tune.xlsx row: main AUC with lesion-level CI, subgroup AUCs, the main AUC under
    each shift (`shifted`: shift name -> scores [N]), selection value."""
    keep = comparison.mask(rows)
    y, sk = comparison.labels(rows), s[keep]
    groups = protocol.group_labels(rows)
    cis = metrics.bootstrap_cis(y, sk, None if groups is None else groups[keep],
                                n=opts.bootstrap, seed=opts.seed)
    method, tta = det.split_config_name(name)
    row = {"configuration": name, "method": method, "tta": tta,
           "auc": metrics.roc_auc(y, sk), "auc_low": cis.get("auc", (math.nan,) * 2)[0],
           "auc_high": cis.get("auc", (math.nan,) * 2)[1],
           "n_normal": int((y == 0).sum()), "n_anomaly": int((y == 1).sum())}
    worst = {}
    for column in by:
        aucs = []
        for group in protocol.subgroups(_text_values(rows, column)[keep], y,
                                        minimum=opts.min_subgroup):
            auc = metrics.roc_auc(y[group.normals], sk[group.normals])
            row[f"auc[{column}={group.value}]"] = auc
            row[f"n[{column}={group.value}]"] = group.n_normal
            if group.counted and math.isfinite(auc):
                aucs.append(auc)
        worst[column] = min(aucs) if aucs else math.nan
    select_cols = _select_column(opts)
    under = {}
    for shift, values in (shifted or {}).items():
        under[shift] = metrics.roc_auc(y, values[keep])
        row[f"auc[shift={shift}]"] = under[shift]
    row["select"] = selection_value(worst[select_cols[0]] if select_cols else row["auc"], under)
    return row


def combination_pairs(ranked: list[str], available: set[str]) -> list[tuple[str, str]]:
    """Pairs of the ranked single configurations, each followed by its one-pass counterpart
    (both components without TTA) when that is another pair of two different methods in
    `available`: the tolerance rule can then prefer it when it is nearly as good."""
    pairs: list[tuple[str, str]] = []
    for a, b in itertools.combinations(ranked, 2):
        plain = tuple(det.config_name(det.split_config_name(c)[0], False) for c in (a, b))
        for pair in ((a, b), plain):
            if pair[0] != pair[1] and set(pair) <= available and pair not in pairs \
                    and pair[::-1] not in pairs:
                pairs.append(pair)
    return pairs


def _combinations(rows: list[dict], scores: dict[str, np.ndarray], val: pd.DataFrame,
                  comparison: Comparison, by, opts: TuneOptions,
                  under: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Rank averages of pairs of the `combine` best single configurations (by the rule), and of
    their one-pass counterparts (combination_pairs); under a shift, each component's score is
    placed among the same unshifted validation normals."""
    if opts.combine < 2:
        return []
    ranked = sorted((r for r in rows if math.isfinite(r["select"])),
                    key=lambda r: -r["select"])[:opts.combine]
    normals = (val["class"] == comparison.normal).to_numpy()
    out = []
    for a, b in combination_pairs([r["configuration"] for r in ranked], set(scores)):
        refs = [np.sort(scores[c][normals]) for c in (a, b)]
        combined = ds.rank_average([scores[a], scores[b]], refs)
        name = f"rank-average({a} + {b})"
        scores[name] = combined
        for shifted in under.values():
            shifted[name] = ds.rank_average([shifted[a], shifted[b]], refs)
        row = _evaluate(name, combined, val, comparison, by, opts,
                        shifted={sh: under[sh][name] for sh in under})
        row.update({"method": "rank-average", "tta": None, "components": f"{a} + {b}"})
        out.append(row)
    return out


def _with_cost(table: pd.DataFrame) -> pd.DataFrame:
    """Adds `passes` (forward passes per image: 8 with TTA in any component, else 1) and
    `n_components` (1, or the number of rank-averaged scores)."""
    table = table.copy()
    parts = [c.split(" + ") if isinstance(c, str) and c else [name]
             for c, name in zip(table.get("components", [None] * len(table)),
                                table["configuration"])]
    table["n_components"] = [len(p) for p in parts]
    table["passes"] = [ds.N_VIEWS if any(det.split_config_name(q)[1] for q in p) else 1
                       for p in parts]
    return table


def select_row(table: pd.DataFrame, tolerance: float) -> pd.Series:
    """The chosen row: the cheapest (passes, then n_components) of the rows whose `select` is
    within `tolerance` of the best, then the highest `select`, then the first in grid order."""
    finite = table[np.isfinite(table["select"].to_numpy(dtype=np.float64))]
    if finite.empty:
        raise UserError("No configuration has a finite validation selection value (too few "
                        "normals per subgroup, or one class missing); lower --min-subgroup or "
                        "use --select auc.")
    near = finite[finite["select"] >= finite["select"].max() - tolerance]
    order = near.assign(_order=np.arange(len(near))).sort_values(
        ["passes", "n_components", "select", "_order"], ascending=[True, True, False, True],
        kind="stable")
    return order.iloc[0].drop("_order")


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    out = table.sort_values("select", ascending=False, kind="stable").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def _detector(best: pd.Series, best_value: float, scores: dict[str, np.ndarray],
              val: pd.DataFrame, comparison: Comparison, model: AnoModel,
              opts: TuneOptions, *, bank_images: int, shifts: dict | None) -> det.Detector:
    name = best["configuration"]
    normals = (val["class"] == comparison.normal).to_numpy()
    if best["method"] == "rank-average":
        parts = [det.split_config_name(p) for p in best["components"].split(" + ")]
        comps = tuple(det.Component(m, t, tuple(np.sort(scores[det.config_name(m, t)][normals])
                                                .tolist())) for m, t in parts)
        combine = "rank-average"
    else:
        comps, combine = (det.Component(*det.split_config_name(name)),), "single"
    s = scores[name]
    threshold, rule, _note = metrics.choose_threshold(metrics.parse_threshold(opts.threshold),
                                                      comparison.labels(val),
                                                      s[comparison.mask(val)], where="tune")
    uses_bank = any(registry.parse(c.method).needs_bank for c in comps)
    policy = model.recorded_policy
    return det.Detector(
        comps, combine, float(threshold), rule, comparison.name,
        tuple(np.sort(s[normals]).tolist()),
        {"rule": opts.select, "value": float(best["select"]), "tolerance": opts.tolerance,
         "best_value": best_value, **({"shifts": shifts} if shifts else {})},
        "bank.safetensors" if uses_bank else None, model.network_sha256,
        model.encoder_sha256,
        None if policy is None else policy.to_dict(), model.kappa, model.feature_layer,
        {"val_auc": float(best["auc"]), "val_auc_ci": [float(best["auc_low"]),
                                                        float(best["auc_high"])],
         "bank_images": bank_images, "bank_dims": opts.dims})

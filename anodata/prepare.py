"""`anostyle prepare`: raw dermoscopy images -> NVlabs-compatible train/val/test datasets.

The zips follow the dataset format of NVlabs' stylegan2-ada-pytorch `dataset_tool.py` (Karras et
al. 2020, "Training Generative Adversarial Networks with Limited Data"); splits are grouped by
lesion as HAM10000 asks (Tschandl et al. 2018, Sci. Data 5:180161: several images per lesion).

Writes into `dest`:
  train.zip, val.zip, test.zip   PNGs `NNNNN/imgNNNNNNNN.png` + dataset.json
                                 `{"labels": [[name, label], ...]}`, label 0 = normal; train.zip
                                 holds normal images only (the GAN learns what normal looks like);
                                 dataset.json also holds `"anostyle": {"images": {name: {"image":
                                 original id, "group": group}}}` (NVlabs tools read `labels` only)
  manifest.csv                   file,source,class,label,group,split,sha256 (one row per image),
                                 then every other column of the --labels CSV (e.g. dx_type, age;
                                 a name that clashes with these gets the prefix `meta_`)
  rejected.csv                   source,reason (every input left out, and why)
  framing.csv                    with --framing lesion only: source,file,split,reason (every
                                 image fitted as with framing 'frame', as no lesion was found)
  prepare.json                   options, policy, class map {name: label}, counts, how the splits
                                 were made (and the groups new to --splits-from), elapsed seconds

Conventions: `source` paths are relative to --source; `sha256` is the hash of the source file's
bytes (it also finds duplicates: the same bytes twice are kept once); labels 1..k are the
non-normal classes sorted by name. Splits are grouped (one group, e.g. a HAM10000 lesion, never
sits in two splits) and depend only on the inputs and --seed, never on --workers or the
file-system order. Splits come from split folders (layout b), a split column of the CSV, an
earlier run's manifest.csv or splits.csv (--splits-from: groups not in it are split by the seeded
rule and reported), or else the seeded rule. Pixel handling (alpha, 16 bit, EXIF, ...) is described in stylegan/imageio.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from anodata.policy import (COLOUR_NORMS, POLICY_KEY, RESIZE_FILTERS, TRANSFORMS, Preprocessing,
                            fit_raw_framed)
from anodata.sources import (SPLITS, Candidate, CsvSpec, Rejection, find_candidates,
                             normalise_split)
from stylegan.errors import UserError
from stylegan.fileio import atomic_path
from stylegan.imageio import ImageRejected
from stylegan.progress import progress

MANIFEST_COLUMNS = ("file", "source", "class", "label", "group", "split", "sha256")
META_PREFIX = "meta_"  # for a metadata column whose name clashes with MANIFEST_COLUMNS
RECORDS_KEY = "anostyle"  # dataset.json key of the image records (NVlabs tools read "labels")
OUTPUT_NAMES = ("train.zip", "val.zip", "test.zip", "manifest.csv", "rejected.csv", "prepare.json")
FRAMING_CSV = "framing.csv"  # written (with the others) when the policy frames the lesion
PNG_COMPRESS_LEVEL = 6  # zlib level (PIL default): 15% smaller than 3 for half the speed


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `prepare_dataset` needs; saved in prepare.json."""

    source: Path
    dest: Path
    normal: tuple[str, ...]  # class names that count as normal (label 0)
    labels: Path | None = None  # metadata CSV (layout c)
    id_column: str | None = None  # None: image_id, image or isic_id, whichever exists
    label_column: str | None = None
    group_column: str | None = None  # e.g. lesion_id; None: each image is its own group
    onehot_columns: tuple[str, ...] = ()  # ISIC ground truth: one 0/1 column per class
    onehot_zero_class: str | None = None  # class of rows whose one-hot columns are all 0
    split_column: str | None = None  # CSV column with train/val/test per image
    splits_from: Path | None = None  # an earlier manifest.csv or a splits.csv (group,split)
    model: Path | None = None  # a model folder whose recorded policy these options must match
    # The preprocessing policy (anodata.policy.Preprocessing, whose defaults these are).
    resolution: int = Preprocessing.resolution
    transform: str = Preprocessing.transform
    resize_filter: str = Preprocessing.resize_filter
    colour: str = Preprocessing.colour
    colour_p: float = Preprocessing.colour_p
    border: str = Preprocessing.border
    intensity: str = Preprocessing.intensity
    intensity_target: float = Preprocessing.intensity_target
    framing: str = Preprocessing.framing
    lesion_max_side: float = Preprocessing.lesion_max_side
    channels: int = Preprocessing.channels
    val: float = 0.1
    test: float = 0.2
    seed: int = 0
    max_per_class: int | None = None
    workers: int | None = None  # None: number of CPUs
    strict: bool = False  # the CLI exits 1 when anything was rejected
    # An abnormal image GIVEN the train split (a split column, folders or --splits-from):
    # 'reject' it (train.zip holds normals only), or move it to 'val', where it still helps
    # to choose (nothing but normals is ever trained on, and test stays as given).
    train_anomalies: str = "reject"

    def __post_init__(self):
        for name in ("source", "dest", "labels", "splits_from", "model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("normal", "onehot_columns"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(v.strip() for v in value if v.strip()))
        _validate(self)

    @property
    def policy(self) -> Preprocessing:
        """The preprocessing policy these options apply (recorded in prepare.json)."""
        return Preprocessing(resolution=self.resolution, channels=self.channels,
                             transform=self.transform, resize_filter=self.resize_filter,
                             colour=self.colour, colour_p=self.colour_p, border=self.border,
                             intensity=self.intensity, intensity_target=self.intensity_target,
                             framing=self.framing, lesion_max_side=self.lesion_max_side)


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_dataset` wrote."""

    dest: Path
    class_map: dict[str, int]  # class name -> label
    counts: dict[str, dict[str, int]]  # split -> class name -> number of images
    num_rejected: int
    elapsed_seconds: float
    splits: str = "seeded"  # how the splits were made: seeded, folders, column or file
    new_groups: tuple[str, ...] = ()  # --splits-from: groups not in the file (seeded rule)
    rejected_kinds: tuple[tuple[str, int], ...] = ()  # (kind of reason, count): reason_counts
    framing: str = Preprocessing.framing
    num_unframed: int = 0  # framing 'lesion': images fitted as with 'frame' (framing.csv)

    @property
    def num_images(self) -> int:
        return sum(sum(per_class.values()) for per_class in self.counts.values())


@dataclass(frozen=True)
class _Item:
    """A decoded, deduplicated candidate: its PNG sits in the spool file at [offset, +length)."""

    candidate: Candidate
    sha256: str
    offset: int
    length: int
    split: str = ""
    framing_note: str = ""  # why the lesion framing was not applied ('' when it was or not asked)


def _validate(o: PrepareOptions) -> None:
    if not o.source.is_dir():
        raise UserError(f"--source {o.source} is not a folder; give the folder of raw images.")
    if o.labels is not None and not o.labels.is_file():
        raise UserError(f"--labels {o.labels} does not exist; give the metadata CSV.")
    if not o.normal:
        raise UserError("--normal is empty; name the normal class(es), e.g. --normal nv.")
    if o.resolution < 4 or o.resolution & (o.resolution - 1):
        raise UserError(f"--resolution {o.resolution} is not a power of two >= 4; StyleGAN needs "
                        f"e.g. 64, 128 or 256.")
    if o.transform not in TRANSFORMS or o.resize_filter not in RESIZE_FILTERS:
        raise UserError(f"--transform must be one of {', '.join(TRANSFORMS)} and --resize-filter "
                        f"one of {', '.join(RESIZE_FILTERS)}.")
    if o.colour not in COLOUR_NORMS:
        raise UserError(f"--colour must be one of {', '.join(COLOUR_NORMS)}.")
    if not 1 <= o.colour_p <= 64:
        raise UserError(f"--colour-p {o.colour_p} is out of range; use 1 (grey world) to 64, "
                        f"e.g. 6.")
    if o.channels not in (1, 3):
        raise UserError(f"--channels {o.channels} is not 1 or 3.")
    _ = o.policy  # the other policy fields (border, intensity, framing) are checked there
    if not (0 <= o.val < 1 and 0 <= o.test < 1 and o.val + o.test < 1):
        raise UserError(f"--val {o.val} and --test {o.test} must be fractions >= 0 whose sum is "
                        f"below 1 (the rest of the normal images is train).")
    if not 0 <= o.seed < 2**32:
        raise UserError(f"--seed {o.seed} must be in 0..2**32-1.")
    if (o.max_per_class is not None and o.max_per_class < 1) or (
            o.workers is not None and o.workers < 1):
        raise UserError("--max-per-class and --workers must be at least 1.")
    if o.train_anomalies not in ("reject", "val"):
        raise UserError(f"--train-anomalies {o.train_anomalies!r} must be reject or val.")
    _validate_csv_options(o)
    _validate_split_options(o)


def _validate_split_options(o: PrepareOptions) -> None:
    if o.splits_from is not None and not o.splits_from.is_file():
        raise UserError(f"--splits-from {o.splits_from} does not exist; give an earlier run's "
                        f"manifest.csv or a splits.csv with columns group,split.")
    if o.splits_from is not None and o.split_column is not None:
        raise UserError("--splits-from and --split-column both set the splits; give one.")
    if o.model is not None:
        from anodata.modelpolicy import check_policy_matches
        check_policy_matches(o.model, o.policy)


def _validate_csv_options(o: PrepareOptions) -> None:
    csv_flags = [o.id_column, o.label_column, o.group_column, o.onehot_zero_class,
                 o.split_column]
    if o.labels is None and (any(f is not None for f in csv_flags) or o.onehot_columns):
        raise UserError("--id-column, --label-column, --group-column, --split-column and "
                        "--onehot-columns need --labels CSV.")
    if o.labels is not None and (o.label_column is None) == (not o.onehot_columns):
        raise UserError(f"--labels {o.labels}: give exactly one of --label-column (e.g. dx) and "
                        f"--onehot-columns (e.g. MEL,NV,BCC).")
    if o.onehot_zero_class is not None and not o.onehot_columns:
        raise UserError("--onehot-zero-class only applies with --onehot-columns.")


# ----------------------------------------------------------------------------- entry point

def prepare_dataset(options: PrepareOptions) -> PrepareSummary:
    """Build {train,val,test}.zip, manifest.csv, rejected.csv and prepare.json in options.dest.

    All six files are written to temporary files first and renamed together at the end, so a
    failure leaves the previous outputs (if any) as they were.
    """
    start = time.perf_counter()
    csv_spec = None if options.labels is None else CsvSpec(
        options.labels, options.id_column, options.label_column, options.group_column,
        options.onehot_columns, options.onehot_zero_class, options.split_column)
    known = None if options.splits_from is None else read_split_file(options.splits_from)
    candidates, rejected = find_candidates(options.source, csv_spec=csv_spec, exclude=options.dest)
    try:
        class_map = make_class_map(sorted({c.class_name for c in candidates}), options.normal,
                                   source=options.source)
        candidates = cap_per_class(candidates, options.max_per_class, seed=options.seed)
        origin = _split_origin(candidates, options)
        if known is not None:
            candidates = apply_known_splits(candidates, known)
        check_group_splits(candidates)
        meta_columns = manifest_meta_columns(candidates)
        options.dest.mkdir(parents=True, exist_ok=True)
        names = OUTPUT_NAMES + ((FRAMING_CSV,) if options.framing == "lesion" else ())
        with ExitStack() as outputs:
            tmp = {name: outputs.enter_context(atomic_path(options.dest / name))
                   for name in names}
            # Decoded PNGs wait in an anonymous file (gone even after a crash) until the splits
            # are known.
            with tempfile.TemporaryFile(dir=options.dest, prefix=".prepare-spool-") as spool:
                items = _decode_all(candidates, rejected, spool=spool, options=options)
                items = assign_splits(items, class_map, rejected,
                                      train_anomalies=options.train_anomalies, val=options.val,
                                      test=options.test, seed=options.seed)
                _check_usable(items, options)
                rows = _write_zips(items, class_map, meta_columns, spool=spool, tmp=tmp)
            new_groups = () if known is None else tuple(sorted(
                {it.candidate.group for it in items} - set(known)))
            unframed = [(it, row) for it, row in zip(items, rows) if it.framing_note]
            summary = PrepareSummary(options.dest, class_map, count_images(rows, class_map),
                                     len(rejected), round(time.perf_counter() - start, 3),
                                     splits=origin, new_groups=new_groups,
                                     rejected_kinds=tuple(reason_counts(rejected)),
                                     framing=options.framing, num_unframed=len(unframed))
            note = empty_splits_note(summary.counts, origin, options)
            if note:
                warnings.warn(note, UserWarning, stacklevel=2)
            _write_csv(tmp["manifest.csv"], MANIFEST_COLUMNS + tuple(meta_columns.values()),
                       rows)
            _write_rejected(tmp["rejected.csv"], rejected)
            if FRAMING_CSV in tmp:
                _write_csv(tmp[FRAMING_CSV], ("source", "file", "split", "reason"),
                           [{"source": it.candidate.source, "file": row["file"],
                             "split": it.split, "reason": it.framing_note}
                            for it, row in sorted(unframed, key=lambda p: p[0].candidate.source)])
            tmp["prepare.json"].write_text(json.dumps(_info(options, summary), indent=2) + "\n")
        if options.framing != "lesion":  # not to be mistaken for this run's
            (options.dest / FRAMING_CSV).unlink(missing_ok=True)
    except UserError:
        if rejected:
            with atomic_path(options.dest / "rejected.csv") as path:
                _write_rejected(path, rejected)
        raise
    return summary


def make_class_map(classes: list[str], normal: tuple[str, ...], *, source: Path) -> dict[str, int]:
    """Class name -> label: the normal classes 0, the others 1..k sorted by name."""
    if not classes:
        raise UserError(f"No usable image was found in {source} (see rejected.csv in --dest); "
                        f"check --source and the layout (class folders or --labels CSV).")
    unknown = [name for name in normal if name not in classes]
    if unknown:
        raise UserError(f"--normal {','.join(unknown)} is not a class of {source}; classes "
                        f"found: {', '.join(classes)}.")
    others = [name for name in classes if name not in normal]
    return {**{name: 0 for name in sorted(normal)},
            **{name: label for label, name in enumerate(others, start=1)}}


def _rng(seed: int, stratum: str) -> np.random.RandomState:
    """A RandomState per (seed, class name): one class's content never shifts another's draw."""
    return np.random.RandomState([seed, zlib.crc32(stratum.encode())])


def _groups(candidates: Iterable[Candidate]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.group, []).append(c)
    return groups


def cap_per_class(candidates: list[Candidate], max_per_class: int | None, *,
                  seed: int) -> list[Candidate]:
    """Keep at most max_per_class images per class, taking whole groups in seeded random order."""
    if max_per_class is None:
        return candidates
    kept: list[Candidate] = []
    for class_name in sorted({c.class_name for c in candidates}):
        groups = _groups(c for c in candidates if c.class_name == class_name)
        keys = sorted(groups)
        count = 0
        for k in _rng(seed, class_name).permutation(len(keys)):
            members = groups[keys[k]]
            if count + len(members) <= max_per_class:
                kept += members
                count += len(members)
    return sorted(kept, key=lambda c: c.source)


# ----------------------------------------------------------------------------- parallel map

def _pool(workers: int):
    """A process pool for workers > 1, else a context that yields None (work in this process)."""
    if workers <= 1:
        return nullcontext(None)
    return multiprocessing.get_context().Pool(workers)


def _map(fn: Callable, args: list, *, pool, desc: str) -> Iterator:
    """fn over args in order, in the pool when there is one, with a progress bar."""
    if pool is None:
        results = map(fn, args)
    else:
        chunksize = max(1, min(32, len(args) // 64))
        results = pool.imap(fn, args, chunksize=chunksize)
    yield from progress(results, total=len(args), desc=desc, unit="img", leave=False)


# ----------------------------------------------------------------------------- decoding

def _decode_all(candidates: list[Candidate], rejected: list[Rejection], *, spool,
                options: PrepareOptions) -> list[_Item]:
    """Decode and encode every candidate (in parallel) into the spool file, in input order.

    Files that cannot be used are rejected with their reason; the same source bytes seen again
    are rejected as a duplicate of the first (in sorted source order).
    """
    encode = partial(_encode_file, policy=options.policy)
    paths = [str(options.source / c.source) for c in candidates]
    first_seen: dict[str, Candidate] = {}
    items = []
    with _pool(options.workers or os.cpu_count() or 1) as pool:
        for c, (png, sha, reason, note) in zip(candidates, _map(encode, paths, pool=pool,
                                                                desc="decoding")):
            if reason is not None:
                rejected.append(Rejection(c.source, reason))
            elif sha in first_seen:
                kept = first_seen[sha]
                rejected.append(Rejection(c.source, f"duplicate of {kept.source}"
                                          + _split_note(kept, c)))
            else:
                first_seen[sha] = c
                items.append(_Item(c, sha, offset=spool.tell(), length=len(png),
                                   framing_note=note))
                spool.write(png)
    return items


def _split_note(kept: Candidate, dropped: Candidate) -> str:
    """' (kept in train; this copy was given test)' when the two copies were given different
    splits (an official split that holds the same file twice), else ''."""
    if dropped.split is None or kept.split == dropped.split:
        return ""
    return f" (kept in {kept.split or 'the seeded split'}; this copy was given {dropped.split})"


def reason_counts(rejected: list[Rejection]) -> list[tuple[str, int]]:
    """(kind of reason, count), most frequent first: a reason with its file names, line numbers
    and quoted values replaced by '…', so that rejections of one kind count together."""
    counts: dict[str, int] = {}
    for r in rejected:
        kind = re.sub(r"'[^']*'|\"[^\"]*\"|\S+\.[A-Za-z0-9]{2,5}\b|\b\d+\b", "…", r.reason)
        counts[kind] = counts.get(kind, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# ----------------------------------------------------------------------------- splits

def read_split_file(path: Path) -> dict[str, str]:
    """group -> split from an earlier run's manifest.csv or a splits.csv (columns group, split;
    split values train/val/test, any case)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("group", "split") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"--splits-from {path} has no column {', '.join(missing)}; give "
                                f"an earlier run's manifest.csv or a CSV with columns group,split.")
            rows = [(reader.line_num, row["group"] or "", row["split"] or "") for row in reader]
    except UnicodeDecodeError:
        raise UserError(f"--splits-from {path} is not UTF-8 text; save it as UTF-8 CSV.") from None
    known: dict[str, str] = {}
    for line, group, value in rows:
        group, split = group.strip(), normalise_split(value)
        if not group or split is None:
            raise UserError(f"--splits-from {path} line {line}: group {group!r} with split "
                            f"{value!r}; every row needs a group and one of train, val, test.")
        if known.setdefault(group, split) != split:
            raise UserError(f"--splits-from {path} puts group {group} in both {known[group]} and "
                            f"{split} (line {line}); a group belongs to one split.")
    return known


def _split_origin(candidates: list[Candidate], options: PrepareOptions) -> str:
    """How the splits are made: 'file' (--splits-from), 'column' (--split-column), 'folders'
    (layout b) or 'seeded' (the seeded grouped rule)."""
    if options.splits_from is not None:
        if any(c.split is not None for c in candidates):
            raise UserError(f"--splits-from {options.splits_from}: {options.source} has "
                            f"train/val/test folders, which already give the splits; use one.")
        return "file"
    if options.split_column is not None:
        return "column"
    return "folders" if any(c.split is not None for c in candidates) else "seeded"


def apply_known_splits(candidates: list[Candidate], known: dict[str, str]) -> list[Candidate]:
    """Candidates whose group is in `known` get its split; the others stay free (seeded rule)."""
    return [c if c.group not in known else dataclasses.replace(c, split=known[c.group])
            for c in candidates]


def check_group_splits(candidates: list[Candidate]) -> None:
    """Refuse a group whose images were given different splits (e.g. by a split column)."""
    given: dict[str, str] = {}
    for c in candidates:
        if c.split is None:
            continue
        first = given.setdefault(c.group, c.split)
        if first != c.split:
            raise UserError(f"Group {c.group} has images in both {first} and {c.split} (e.g. "
                            f"{c.source}); give all images of a group (lesion) one split.")

def empty_splits_note(counts: dict[str, dict[str, int]], origin: str,
                      options: PrepareOptions) -> str | None:
    """A sentence naming the splits that hold no image, or None. Splits given by the data (a
    split column, --splits-from, split folders) may legitimately leave some empty (only val.zip
    and test.zip for an existing model), so this warns rather than refuses; with the seeded
    rule a split asked for with a fraction of 0 is expected to be empty."""
    asked = {"train": True, "val": options.val > 0, "test": options.test > 0}
    empty = [s for s in SPLITS if not sum(counts.get(s, {}).values())
             and (origin != "seeded" or asked[s])]
    if not empty:
        return None
    how = {"column": f"the split column {options.split_column!r}",
           "file": f"--splits-from {options.splits_from}", "folders": "the split folders",
           "seeded": "the seeded split"}[origin]
    return (f"{' and '.join(f'{s}.zip' for s in empty)} hold{'s' * (len(empty) == 1)} no image: "
            f"{how} gives {'it' if len(empty) == 1 else 'them'} none; that is right when only "
            f"the other splits are wanted (e.g. val/test for an existing model), otherwise check "
            f"{how}")


def assign_splits(items: list[_Item], class_map: dict[str, int], rejected: list[Rejection], *,
                  val: float, test: float, seed: int,
                  train_anomalies: str = "reject") -> list[_Item]:
    """Give every item a split; sorted by (split, source). Given splits (split folders, a split
    column or --splits-from) are kept; an abnormal image given train is rejected, or moved to
    val with train_anomalies='val'.

    Normal groups go to train/val/test by the fractions; groups with any abnormal image go to
    val/test only, in the same val:test ratio. Each class is split on its own (stratified), its
    groups shuffled by a RandomState of (seed, class).
    """
    out, free = [], []
    moved = set() if train_anomalies != "val" else {  # whole groups, so a lesion stays whole
        it.candidate.group for it in items
        if it.candidate.split == "train" and class_map[it.candidate.class_name] != 0}
    for it in items:
        given = it.candidate.split
        if given == "train" and it.candidate.group in moved:
            out.append(dataclasses.replace(it, split="val"))
        elif given == "train" and class_map[it.candidate.class_name] != 0:
            rejected.append(Rejection(it.candidate.source, f"class {it.candidate.class_name} is "
                                      f"not normal; train.zip holds normal images only"))
        elif given is not None:
            out.append(dataclasses.replace(it, split=given))
        else:
            free.append(it)
    strata: dict[tuple[bool, str], list[list[_Item]]] = {}
    groups = _groups(it.candidate for it in free)
    by_source = {it.candidate.source: it for it in free}
    for key in sorted(groups):
        members = [by_source[c.source] for c in groups[key]]
        abnormal = sorted(m.candidate.class_name for m in members
                          if class_map[m.candidate.class_name] != 0)
        stratum = abnormal[0] if abnormal else min(m.candidate.class_name for m in members)
        strata.setdefault((not abnormal, stratum), []).append(members)
    for (is_normal, stratum), stratum_groups in sorted(strata.items()):
        if not is_normal and val + test == 0:
            reason = "abnormal images go to val/test only, and --val and --test are both 0"
            rejected += [Rejection(m.candidate.source, reason) for g in stratum_groups for m in g]
            continue
        order = _rng(seed, stratum).permutation(len(stratum_groups))
        shuffled = [stratum_groups[k] for k in order]
        splits = split_group_sizes([len(g) for g in shuffled], val=val, test=test,
                                   train=is_normal)
        out += [dataclasses.replace(m, split=s) for g, s in zip(shuffled, splits) for m in g]
    return sorted(out, key=lambda it: (SPLITS.index(it.split), it.candidate.source))


def split_group_sizes(sizes: list[int], *, val: float, test: float, train: bool) -> list[str]:
    """Split names for groups of the given sizes (in order), filling test, then val, then train.

    With train=False (abnormal classes) the fractions become test/(val+test) and the rest val.
    Targets are round-half-up of n * fraction; a group that starts below its target goes in whole.
    """
    n = sum(sizes)
    if not train:
        val, test = val / (val + test), test / (val + test)
    targets = {"test": int(n * test + 0.5), "val": int(n * val + 0.5)}
    counts = Counter()
    out = []
    for size in sizes:
        if counts["test"] < targets["test"]:
            split = "test"
        elif counts["val"] < targets["val"] or not train:
            split = "val"
        else:
            split = "train"
        counts[split] += size
        out.append(split)
    return out


# ----------------------------------------------------------------------------- pixels

def _encode_file(path: str, *, policy: Preprocessing
                 ) -> tuple[bytes | None, str, str | None, str]:
    """Worker: (PNG bytes or None, sha256 of the file bytes, rejection reason or None, why the
    lesion framing was not applied or '')."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, "", f"cannot read the file: {exc.strerror or exc}", ""
    sha = hashlib.sha256(data).hexdigest()  # of the source bytes: finds duplicate files
    try:
        img, note = fit_raw_framed(data, Path(path).suffix, policy)
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    except ImageRejected as exc:
        return None, sha, str(exc), ""
    except Exception as exc:  # one odd file must not end a run over thousands
        return None, sha, f"unexpected error while decoding ({type(exc).__name__}: {exc})", ""
    return buffer.getvalue(), sha, None, note


# ----------------------------------------------------------------------------- writing

def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed date, so the same inputs give byte-identical zips."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def manifest_meta_columns(candidates: list[Candidate]) -> dict[str, str]:
    """CSV metadata column -> its manifest column name (a clash with MANIFEST_COLUMNS, or with
    an earlier name, gets META_PREFIX), in CSV order."""
    names: dict[str, str] = {}
    for c in candidates:
        for column, _ in c.meta:
            if column not in names:
                name = column
                while name in MANIFEST_COLUMNS or name in names.values():
                    name = META_PREFIX + name
                names[column] = name
    return names


def original_id(source: str) -> str:
    """The original image id of a source path: its file stem (e.g. ISIC_0024307)."""
    return Path(source).stem


def _write_zips(items: list[_Item], class_map: dict[str, int], meta_columns: dict[str, str], *,
                spool, tmp: dict[str, Path]) -> list[dict[str, str]]:
    """Copy every item's PNG from the spool into tmp["{split}.zip"], with dataset.json (labels
    and image records); return the manifest rows."""
    labels: dict[str, list[list]] = {split: [] for split in SPLITS}
    records: dict[str, dict[str, dict[str, str]]] = {split: {} for split in SPLITS}
    rows = []
    with ExitStack() as stack:
        zips = {split: stack.enter_context(zipfile.ZipFile(tmp[f"{split}.zip"], "w",
                                                           zipfile.ZIP_STORED))
                for split in SPLITS}
        for it in progress(items, desc="writing", unit="img", leave=False):
            c = it.candidate
            k = len(labels[it.split])
            name = f"{k // 1000:05d}/img{k:08d}.png"
            spool.seek(it.offset)
            zips[it.split].writestr(_zip_entry(name), spool.read(it.length))
            labels[it.split].append([name, class_map[c.class_name]])
            records[it.split][name] = {"image": original_id(c.source), "group": c.group}
            row = {"file": name, "source": c.source, "class": c.class_name,
                   "label": class_map[c.class_name], "group": c.group,
                   "split": it.split, "sha256": it.sha256}
            rows.append(row | {meta_columns[k]: v for k, v in c.meta})
        for split in SPLITS:
            body = {"labels": labels[split], RECORDS_KEY: {"images": records[split]}}
            zips[split].writestr(_zip_entry("dataset.json"), json.dumps(body, indent=0))
    return rows


def _check_usable(items: list[_Item], options: PrepareOptions) -> None:
    """Refuse a result with no image, or with no normal image for train.zip."""
    where = options.dest / "rejected.csv"
    if not items:
        raise UserError(f"No usable image is left in {options.source}; see {where} for why "
                        f"each input was rejected.")
    splits_given = all(it.candidate.split is not None for it in items)
    if not splits_given and not any(it.split == "train" for it in items):
        raise UserError(f"No normal image ({','.join(options.normal)}) is left for train.zip; "
                        f"see {where} for why each input was rejected.")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_rejected(path: Path, rejected: list[Rejection]) -> None:
    rows = [{"source": r.source, "reason": r.reason}
            for r in sorted(rejected, key=lambda r: r.source)]
    _write_csv(path, ("source", "reason"), rows)


def count_images(rows: list[dict], class_map: dict[str, int]) -> dict[str, dict[str, int]]:
    """split -> class -> number of images, every class listed (by label, then name)."""
    counted = Counter((r["split"], r["class"]) for r in rows)
    classes = sorted(class_map, key=lambda name: (class_map[name], name))
    return {split: {name: counted[split, name] for name in classes} for split in SPLITS}


def _info(options: PrepareOptions, summary: PrepareSummary) -> dict:
    """Content of prepare.json."""
    opts = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(options).items()}
    return {
        "options": opts,
        POLICY_KEY: options.policy.to_dict(),
        "class_map": summary.class_map,
        "counts": summary.counts,
        "num_images": summary.num_images,
        "num_rejected": summary.num_rejected,
        "framing": {"framing": summary.framing, "num_whole_frame": summary.num_unframed},
        "splits": {"made_by": summary.splits,
                   "num_new_groups": len(summary.new_groups),
                   "new_groups": list(summary.new_groups)},
        "elapsed_seconds": summary.elapsed_seconds,
        "conventions": {
            "source": "path relative to options.source",
            "sha256": "hash of the source file bytes (used to drop duplicates)",
            "alpha": "composited on black",
            "16-bit": "value >> 8",
            "zip_names": "{split}.zip with NNNNN/imgNNNNNNNN.png and dataset.json",
            "image_records": "dataset.json anostyle.images: {zip name: {image, group}}",
            "framing.num_whole_frame": "framing lesion: images where no lesion was found, "
                                       "fitted as with framing frame (listed in framing.csv)",
            "splits.made_by": "seeded (--seed rule), folders (train/val/test folders), column "
                              "(--split-column) or file (--splits-from; new_groups: groups not "
                              "in the file, split by the seeded rule)",
        },
    }


def format_summary(summary: PrepareSummary) -> str:
    """A table of images per class and split, and the number of rejected inputs."""
    classes = list(summary.class_map)
    width = max([len("total"), *(len(name) for name in classes)])
    lines = [f"{'class':<{width}}  label  " + "  ".join(f"{s:>6}" for s in SPLITS)]
    for name in classes:
        counts = "  ".join(f"{summary.counts[s][name]:>6}" for s in SPLITS)
        lines.append(f"{name:<{width}}  {summary.class_map[name]:>5}  {counts}")
    totals = "  ".join(f"{sum(summary.counts[s].values()):>6}" for s in SPLITS)
    lines.append(f"{'total':<{width}}  {'':>5}  {totals}")
    if summary.splits == "file":
        lines.append(f"{len(summary.new_groups)} groups were not in --splits-from and were split "
                     f"by the seeded rule" + (" (listed in prepare.json)"
                                              if summary.new_groups else ""))
    lines.append(f"{summary.num_images} images written to {summary.dest} in "
                 f"{summary.elapsed_seconds:.1f} s; {summary.num_rejected} inputs rejected"
                 + (f" (see {summary.dest / 'rejected.csv'})" if summary.num_rejected else ""))
    lines += [f"  {n:>6}  {kind}" for kind, n in summary.rejected_kinds]
    if summary.framing == "lesion":
        lines.append(f"framing: {summary.num_images - summary.num_unframed} images cropped "
                     f"around their lesion, {summary.num_unframed} kept the photo's framing (no "
                     f"lesion found; see {summary.dest / FRAMING_CSV})")
    return "\n".join(lines)

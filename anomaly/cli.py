"""The `anostyle` command line: a thin click group; each command parses, validates and calls
one library function. Mistakes a user can fix (`UserError`) end in one sentence, no traceback."""

from __future__ import annotations

import dataclasses
import importlib

import click

from stylegan.errors import UserError


class _Group(click.Group):
    """Click group that turns `UserError` into a one-line error message."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # workflow order, as defined below

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anostyle")
def main() -> None:
    """AnoStyle: unsupervised anomaly detection in dermoscopy with StyleGAN2-ADA and an izif encoder.

    Typical order: prepare -> train-gan -> train-encoder -> tune -> reconstruct -> score ->
    tsne -> evaluate -> report; your own collection: adapt (a tuned model folder from a parent
    one). Every command has --help.
    """


def device_option(help_text: str):
    """--device auto|cpu|cuda, the same on every command that computes."""
    return click.option("--device", default="auto", show_default=True,
                        type=click.Choice(["auto", "cpu", "cuda"]), help=help_text)


class _ConfigOption(click.Option):
    """A click option whose default is the default of the same-named field of a config dataclass
    (written once, there). The dataclass is imported only when the default is needed (the
    command's --help or a run), so that `anostyle --help` stays light."""

    def __init__(self, *args, config: str, **kwargs):
        self._config = config  # "module:Class"
        super().__init__(*args, default=None, show_default=True, **kwargs)

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        show = getattr(self.type, "show", None)  # a type that prints a default as it is typed
        if show is not None and "default" in extra:
            extra["default"] = show(self.default)
        return extra

    @property
    def default(self):
        module, cls = self._config.split(":")
        fields = dataclasses.fields(getattr(importlib.import_module(module), cls))
        (field,) = [f for f in fields if f.name == self.name]
        assert field.default is not dataclasses.MISSING, f"{self._config}.{self.name}"
        return field.default

    @default.setter
    def default(self, _value) -> None:  # click's constructor assigns it; the field decides
        pass


def config_option(config: str):
    """Option factory for one config dataclass ("module:Class"): `@opt("--batch", type=...)`
    takes its default from the field `batch`."""
    def option(*param_decls: str, **kwargs):
        return click.option(*param_decls, cls=_ConfigOption, config=config, **kwargs)
    return option


_gan = config_option("stylegan.options:TrainFlags")
_prep = config_option("anodata.prepare:PrepareOptions")
_fit = config_option("anomaly.model.fit:FitOptions")
_rec = config_option("anomaly.model.reconstruct:ReconstructOptions")
_proj = config_option("anomaly.model.project:ProjectOptions")
_score = config_option("anomaly.scoring.score:ScoreOptions")
_tsne = config_option("anomaly.scoring.score:TsneOptions")
_serve = config_option("anomaly.app.model:ServeOptions")
_access = config_option("anomaly.app.access:AccessOptions")


encoder_option = click.option(
    "--encoder", required=True, type=click.Path(), metavar="CKPT",
    help="encoder-<iter>.safetensors from `anostyle train-encoder`.")


optional_encoder_option = click.option(
    "--encoder", type=click.Path(), metavar="CKPT",
    help="encoder-<iter>.safetensors from `anostyle train-encoder` [--model's].")
model_option = click.option(
    "--model", type=click.Path(), metavar="DIR",
    help="Model folder: DIR/network.safetensors + DIR/encoder.safetensors (+ detector.json); "
         "instead of --network/--encoder.")


def _resolve_model(flags: dict) -> str | None:
    """Fill flags['network'] / flags['encoder'] from flags.pop('model'); returns the folder's
    detector.json (or None)."""
    from anomaly.methods.detector import resolve_model_dir

    flags["network"], flags["encoder"], detector = resolve_model_dir(
        flags.pop("model"), flags.get("network"), flags.get("encoder"))
    return detector


# Commands follow, one section each, in workflow order. Keep each command thin.


# ---- train-gan -------------------------------------------------------------------------------

@main.command("train-gan")
@click.option("--outdir", required=True, metavar="DIR", help="Where to make the run folder.")
@click.option("--data", required=True, metavar="[ZIP|DIR]", help="Training data (train.zip).")
@_gan("--cfg", type=click.Choice(["stylegan2", "paper256", "auto", "cpu"]),
              help="Preset; explicit flags override it. 'cpu': small 64 px net for 2 CPU cores.")
@_gan("--gpus", type=click.IntRange(min=1),
              help="Number of processes (GPUs; on CPU, gloo processes).")
@click.option("--batch", type=click.IntRange(min=1), help="Total batch size [preset].")
@click.option("--batch-gpu", type=click.IntRange(min=1), help="Batch per process [batch/gpus].")
@click.option("--gamma", type=click.FloatRange(min=0), help="R1 regularization weight [preset].")
@click.option("--map-depth", type=click.IntRange(min=1), help="Mapping network depth [preset].")
@click.option("--glr", type=click.FloatRange(min=0), help="G learning rate [preset].")
@click.option("--dlr", type=click.FloatRange(min=0), help="D learning rate [preset].")
@click.option("--cbase", type=click.IntRange(min=1), help="Capacity multiplier [preset].")
@click.option("--cmax", type=click.IntRange(min=1), help="Max. feature maps [preset].")
@_gan("--kimg", type=click.FloatRange(min=0, min_open=True),
              help="Total training length in thousands of images.")
@_gan("--tick", type=click.FloatRange(min=0, min_open=True),
              help="How often to print progress, in kimg.")
@_gan("--snap", type=click.IntRange(min=0),
              help="How often to save snapshots, in ticks (0: only at the end).")
@_gan("--workers", type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@click.option("--resume", metavar="[PKL|CKPT|latest]",
              help="Resume or fine-tune from an official .pkl, our snapshot, or 'latest' in --outdir.")
@click.option("--strict-resume", is_flag=True,
              help="Refuse a --resume file whose architecture differs from the flags.")
@_gan("--mirror", type=bool, metavar="BOOL",
              help="Enable dataset x-flips.")
@_gan("--rot90", type=bool, metavar="BOOL",
              help="Enable dataset rotations by 90, 180 and 270 degrees (with --mirror: all 8 "
                   "symmetries of the square; dermoscopy has no canonical orientation).")
@_gan("--aug", type=click.Choice(["ada", "fixed", "noaug"]),
              help="Augmentation mode.")
@_gan("--p", type=click.FloatRange(0, 1),
              help="Augmentation probability for --aug=fixed (ada starts at 0 and adapts).")
@_gan("--target", type=click.FloatRange(0, 1),
              help="Target value for --aug=ada.")
@_gan("--freezed", type=click.IntRange(min=0),
              help="Freeze the first N layers of D.")
@click.option("--mbstd-group", type=click.IntRange(min=1), help="Minibatch std group size [preset].")
@_gan("--seed", type=int, help="Random seed.")
@_gan("--fp32", type=bool, metavar="BOOL",
              help="Disable mixed precision (CUDA only; CPU always computes in float32).")
@device_option("Where to train.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), metavar="M",
              help="Stop after M minutes of wall time, with a final snapshot [--kimg decides].")
@click.option("-n", "--dry-run", is_flag=True, help="Print the resolved options and exit.")
def train_gan(dry_run: bool, **flags) -> None:
    """Train or fine-tune a StyleGAN2-ADA generator (flags as in the NVlabs tools).

    Example: anostyle train-gan --outdir=training-runs --cfg=stylegan2 --data=train.zip --gpus=1
    --batch=16 --gamma=0.8192 --map-depth=2 --glr=0.0025 --dlr=0.0025 --cbase=16384 --kimg=50
    --snap=5 --resume=stylegan2-ffhq-256x256.pkl
    """
    from stylegan.options import TrainFlags, run_from_flags

    run_dir = run_from_flags(TrainFlags(**flags), dry_run=dry_run, echo=click.echo)
    if run_dir is not None:
        click.echo(f"run folder: {run_dir}")


# ---- prepare ---------------------------------------------------------------------------------

def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    """'MEL, NV,BCC' -> ('MEL', 'NV', 'BCC')."""
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def collection_options(*, required: bool):
    """The options that say where a raw collection is and how it is labelled and split, shared
    by `prepare` and `adapt` (--source and --normal are required when `required`)."""
    options = [
        click.option("--source", required=required, type=click.Path(), metavar="DIR",
                     help="Raw images: DIR/<class>/*, DIR/{train,val,test}/<class>/*, or any "
                          "folder (searched recursively) with --labels."),
        click.option("--labels", type=click.Path(), metavar="CSV",
                     help="Metadata CSV with one row per image (e.g. HAM10000_metadata.csv)."),
        click.option("--id-column", metavar="C",
                     help="CSV column with the image file stem/name [image_id, image or "
                          "isic_id]."),
        click.option("--label-column", metavar="C",
                     help="CSV column with the class name (e.g. dx)."),
        click.option("--group-column", metavar="C",
                     help="CSV column grouping images for splits (e.g. lesion_id) [each image "
                          "alone]."),
        click.option("--onehot-columns", callback=_comma_list, metavar="A,B,..",
                     help="CSV one-hot class columns instead of --label-column (e.g. "
                          "MEL,NV,BCC)."),
        click.option("--onehot-zero-class", metavar="NAME",
                     help="Class of rows whose one-hot columns are all 0 (e.g. nevus for ISIC "
                          "2017)."),
        click.option("--split-column", metavar="C",
                     help="CSV column with each image's split: train, val or test (e.g. an "
                          "official split) [seeded grouped split]."),
        click.option("--splits-from", type=click.Path(), metavar="CSV",
                     help="Reproduce an earlier split: its manifest.csv or a splits.csv "
                          "(group,split); groups not in it are split by the seeded rule and "
                          "reported."),
        click.option("--normal", required=required, callback=_comma_list,
                     metavar="CLASS[,CLASS]",
                     help="Normal class(es): label 0, the only ones in train.zip (e.g. nv)."),
        click.option("--max-per-class", type=click.IntRange(min=1), metavar="N",
                     help="Use at most N images per class (whole groups, seeded) [all]."),
        click.option("--workers", type=click.IntRange(min=1), metavar="N",
                     help="Decoding processes [number of CPUs]."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


@main.command("prepare")
@collection_options(required=True)
@click.option("--model", type=click.Path(), metavar="DIR",
              help="Prepare with the preprocessing recorded by this model folder (e.g. "
                   "models/ham64-cpu); its splits.csv is applied only with --splits-from.")
@click.option("--dest", required=True, type=click.Path(), metavar="DIR",
              help="Output folder for train/val/test.zip, manifest.csv, rejected.csv.")
@_prep("--resolution", type=int,
              help="Output size in pixels (a power of two).")
@_prep("--transform", type=click.Choice(["center-crop", "resize", "pad"]),
              help="How to make images square: crop the middle, stretch, or pad with black.")
@_prep("--resize-filter", type=click.Choice(["box", "lanczos"]), help="Resampling filter (box is fast).")
@_prep("--colour", type=click.Choice(["none", "shades-of-gray"]),
              help="Colour constancy after fitting: shades-of-gray removes the device's colour "
                   "cast (Barata et al. 2015).")
@_prep("--colour-p", type=click.FloatRange(1, 64),
              help="Minkowski norm of shades-of-gray (1: grey world; large: max-RGB).")
@_prep("--border", type=click.Choice(["keep", "fill"]),
              help="fill: a dark circular field-of-view border (a dermatoscope's vignette, "
                   "which HAM10000 lacks) is filled with the skin colour just inside it, so "
                   "that the detector does not score the border instead of the lesion.")
@_prep("--intensity", type=click.Choice(["keep", "normalise"]),
              help="normalise: scale every image so that its skin brightness (the Minkowski "
                   "illuminant estimate of --colour-p) is --intensity-target, so that a "
                   "camera's exposure does not change the score.")
@_prep("--intensity-target", type=click.FloatRange(0, 255, min_open=True),
              help="Skin brightness (0-255) of --intensity normalise.")
@_prep("--framing", type=click.Choice(["frame", "lesion"]),
              help="lesion: before resizing, crop each image to a square around its lesion, "
                   "found without labels (a dark, central region), with a margin of a quarter "
                   "of the lesion's size on each side, so that the lesion fills the same share "
                   "of every image however the photo was framed; an image where no lesion is "
                   "found is fitted as with frame and listed in DEST/framing.csv. frame: the "
                   "photo as it was framed, made square by --transform.")
@_prep("--lesion-max-side", type=click.FloatRange(min=1), metavar="S",
              help="--framing lesion: the most the square around the lesion may measure, in "
                   "short sides of the photo. 1: never past the photo (a lesion too large for "
                   "its margin keeps the photo's scale); above 1 the square reaches past the "
                   "photo, whose edges are reflected into it, so that large lesions are framed "
                   "at the same scale as small ones (at most 4).")
@click.option("--channels", default="3", show_default=True, type=click.Choice(["3", "1"]),
              help="3: RGB PNGs; 1: grayscale PNGs.")
@_prep("--val", type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the normal images for val (abnormal: val:test ratio).")
@_prep("--test", type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the normal images for test.")
@_prep("--seed", type=click.IntRange(0, 2**32 - 1),
              help="Seed of the grouped random split.")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any input was rejected.")
@_prep("--train-anomalies", type=click.Choice(["reject", "val"]),
       help="An abnormal image given the train split (a split column, folders, --splits-from): "
            "reject it, or move it (with its lesion) to val, where it helps to choose.")
def prepare(channels: str, model: str | None, **flags) -> None:
    """Build NVlabs-compatible train/val/test zips from raw dermoscopy images.

    train.zip holds normal images only (label 0); val.zip and test.zip hold every class
    (1..k: the other classes sorted by name). Splits are grouped, so a lesion never sits in two
    splits. Inputs that cannot be used are listed with the reason in DEST/rejected.csv.

    \b
    Example (HAM10000):
      anostyle prepare --source ham10000/images --labels ham10000/HAM10000_metadata.csv \\
        --id-column image_id --label-column dx --group-column lesion_id --normal nv \\
        --dest prepared --resolution 256

    With --model DIR the resolution, transform, filter, colour, border, intensity and framing
    settings (--lesion-max-side too) are the model's (a flag that contradicts them is refused).
    """
    from click.core import ParameterSource

    from anodata.prepare import PrepareOptions, format_summary, prepare_dataset

    flags["channels"] = int(channels)
    if model is not None:
        from anodata.modelpolicy import POLICY_FIELDS, policy_for_model

        ctx = click.get_current_context()
        given = {k: flags[k] for k in POLICY_FIELDS
                 if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
        found = policy_for_model(model, given)
        flags.update(found.policy.to_dict())
        if found.note:
            click.echo(f"note: --model {model}: {found.note}", err=True)
    options = PrepareOptions(model=model, **flags)
    summary = prepare_dataset(options)
    click.echo(format_summary(summary))
    if options.strict and summary.num_rejected:
        raise UserError(f"--strict: {summary.num_rejected} inputs were rejected; see "
                        f"{summary.dest / 'rejected.csv'} (run without --strict to accept that).")


# ---- convert / generate ----------------------------------------------------------------------

@main.command("convert")
@click.option("--network", required=True, type=click.Path(), metavar="PKL",
              help="Official NVlabs StyleGAN2(-ADA) snapshot (.pkl); nothing in it is executed.")
@click.option("--out", required=True, type=click.Path(), metavar="DIR|FILE.safetensors",
              help="Output file, or a folder that receives <pkl name>.safetensors.")
def convert(network: str, out: str) -> None:
    """Convert an official network pickle into an AnoStyle checkpoint (weights + JSON config).

    Example: anostyle convert --network stylegan2-ffhq-256x256.pkl --out checkpoints/
    """
    from stylegan.checkpoint import convert_pickle, describe_networks

    written, found = convert_pickle(network, out)
    click.echo(describe_networks(found))
    click.echo(f"wrote {written}")


_gen = config_option("stylegan.generate:GenerateOptions")


@main.command("generate")
@click.option("--network", required=True, type=click.Path(), metavar="PKL|CKPT",
              help="Official .pkl or AnoStyle .safetensors network (G_ema is used when present).")
@click.option("--seeds", required=True, metavar="LIST",
              help="Seeds and inclusive ranges, e.g. 0-7,12 (latent = RandomState(seed).randn).")
@_gen("--trunc", "truncation_psi", type=float, help="Truncation psi (1: none).")
@_gen("--noise-mode", type=click.Choice(["const", "random", "none"]),
      help="Per-pixel noise input.")
@click.option("--class", "class_idx", type=click.IntRange(min=0), metavar="IDX",
              help="Class index; required for conditional networks.")
@click.option("--outdir", required=True, type=click.Path(), metavar="DIR",
              help="Where to write seedNNNN.png and grid.png.")
@_gen("--batch", "batch_size", type=click.IntRange(min=1), help="Images per forward pass.")
@_gen("--device", type=str, help="cpu, cuda or cuda:N.")
def generate(seeds: str, **flags) -> None:
    """Generate images for the given seeds, as NVlabs gen_images.py does.

    Example: anostyle generate --network network-snapshot-000200.safetensors --seeds 0-15
    --trunc 0.7 --outdir out/
    """
    from stylegan.generate import GenerateOptions, generate_images, parse_seeds

    written = generate_images(GenerateOptions(seeds=tuple(parse_seeds(seeds)), **flags))
    click.echo(f"wrote {len(written) - 1} images and {written[-1]}")


# ---- reference -------------------------------------------------------------------------------

_ref = config_option("anomaly.evaluation.reference.run:ReferenceOptions")


@main.command("reference")
@click.option("--prepared", required=True, type=click.Path(), metavar="DIR",
              help="Folder of `anostyle prepare`: val.zip (trained on), test.zip (scored).")
@click.option("--outdir", required=True, type=click.Path(), metavar="DIR",
              help="The score folder: reference.xlsx and reference.json go here.")
@_ref("--backbone", type=click.Choice(["efficientnet-lite0", "small-cnn"]),
      help="ImageNet EfficientNet-Lite0 features + logistic regression (the `reference` "
           "extra), or a small CNN trained from scratch.")
@click.option("--size", type=click.IntRange(min=16), metavar="PX",
              help="Backbone input size [224 for efficientnet-lite0, 64 for small-cnn].")
@click.option("--normal-class", metavar="NAME", help="Normal class [the class labelled 0].")
@click.option("--anomaly-class", metavar="NAME",
              help="Anomaly class trained against [mel when present, else all others].")
@_ref("--folds", type=click.IntRange(min=2),
      help="Lesion-grouped cross-validation folds inside validation.")
@_ref("--cs", type=click.FloatRange(min=0, min_open=True), multiple=True, metavar="C",
      help="Logistic regression C values tried by cross-validation; repeat the flag.")
@_ref("--epochs", type=click.IntRange(min=1), multiple=True, metavar="N",
      help="small-cnn epoch counts tried by cross-validation; repeat the flag.")
@_ref("--seed", type=int, help="Seed of the folds and the classifier.")
@_ref("--batch", type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--cache", type=click.Path(), metavar="DIR",
              help="Feature cache folder [DIR/features of --prepared].")
def reference(**flags) -> None:
    """Supervised reference: what the validation labels buy -> reference.xlsx.

    A classifier is trained on the labelled VALIDATION images only (its setting chosen by
    lesion-grouped cross-validation inside validation), then scores test like any method.
    `evaluate` shows it as a "reference (uses labels)" row apart from the baselines.

    \b
    Example:
      anostyle reference --prepared prepared --outdir scores
    """
    from anomaly.evaluation.reference.run import ReferenceOptions, run_reference

    written = run_reference(ReferenceOptions(**flags))
    import json

    record = json.loads(written["record"].read_text())
    (setting, value), = [(k, v) for k, v in record["chosen"].items()
                         if k not in ("folds", "cv_auc")]
    click.echo(f"{record['backbone']} at {record['input_size']} px, trained on "
               f"{record['trained_on']['images']} validation images "
               f"({record['normal_class']} vs {'+'.join(record['anomaly_classes'])}); {setting} "
               f"{value:g} by {record['chosen']['folds']}-fold lesion-grouped CV (val AUC "
               f"{record['chosen']['cv_auc']:.3f}); {record['images']} images in "
               f"{record['seconds']:g} s")
    click.echo(f"wrote {written['sheet']} and {written['record']}")


# ---- evaluate / report -----------------------------------------------------------------------

_eval = config_option("anomaly.evaluation.evaluate:EvaluateOptions")


class _IntList(click.ParamType):
    """'8,16,32' -> (8, 16, 32): a comma-separated list of positive integers (a bad list ends
    in one sentence, as every `UserError`)."""

    name = "N,N,..."

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):  # the dataclass default
            return value
        try:
            values = tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise UserError(f"{param.opts[0]} '{value}' is not a list of positive integers, "
                            f"e.g. 8,16,32.")
        return values

    @staticmethod
    def show(value: tuple[int, ...]) -> str:
        """How --help prints a default: as it is typed."""
        return ",".join(str(v) for v in value)


@main.command("evaluate")
@click.option("--scores", "scores_dir", required=True, type=click.Path(), metavar="DIR",
              help="Folder of <method>.xlsx score sheets written by `anostyle score`.")
@click.option("--outdir", default="graphics", show_default=True, type=click.Path(), metavar="DIR",
              help="Where figures, summary.xlsx and summary.json go.")
@click.option("--normal-class", metavar="NAME",
              help="Normal class name [the class labelled 0, e.g. nv].")
@click.option("--anomaly-class", metavar="NAME|all",
              help="Main anomaly class [mel when present, else all]; then normal vs rest, vs "
                   "each class.")
@_eval("--threshold", type=str, metavar="youden|p95|VALUE",
       help="Decision threshold, chosen on the val split only and applied to test.")
@_eval("--bootstrap", type=click.IntRange(min=0),
       help="Bootstrap resamples (lesions when the sheets have a group column) for the "
            "95% CIs and the paired test (0: no CI; paired test by DeLong).")
@_eval("--seed", type=click.IntRange(min=0), help="Seed of the bootstrap.")
@_eval("--split", type=click.Choice(["test", "val"]),
       help="Evaluated split; 'val' reads no test row at all (for tuning).")
@click.option("--primary", metavar="METHOD",
              help="Primary method, declared before test is read [best validation AUC].")
@click.option("--by", multiple=True, metavar="COLUMN[:EDGES]",
              help="Subgroup AUCs by a score-sheet column (normals restricted to each value vs "
                   "all anomalies), e.g. --by dx_type --by age:40,60; repeatable.")
@_eval("--baseline", type=click.Choice(["knn", "knn-pixels", "none"]),
       help="Also score and evaluate the pixel and colour k-NN detectors, configured on "
            "val (needs the dataset; 'knn-pixels' is the old name of 'knn').")
@click.option("--prepared", type=click.Path(), metavar="DIR",
              help="Prepared dataset folder for the baselines [the 'prepared' entry of "
                   "DIR/score.json].")
@_eval("--knn-sizes", type=_IntList(), metavar="N,N,...",
       help="Pixel k-NN resolutions tried on val.")
@_eval("--knn-bins", type=_IntList(), metavar="N,N,...",
       help="Colour k-NN histogram bins per channel tried on val.")
@_eval("--knn-k", type=_IntList(), metavar="N,N,...", help="Neighbour counts k tried on val.")
def evaluate(by: tuple[str, ...], **flags) -> None:
    """ROC/AUC with lesion-level CIs, paired tests vs the best baseline, subgroups, figures.

    Every <method>.xlsx in --scores is evaluated on its test rows (or val rows with --split
    val): normal vs the anomaly class, normal vs all other classes, and normal vs each class.
    Thresholds, baselines and the primary method are chosen on the val split only.

    \b
    Example:
      anostyle evaluate --scores scores --outdir graphics --prepared prepared --by dx_type
    """
    from anomaly.evaluation.evaluate import EvaluateOptions, evaluate_scores, format_summary

    click.echo(format_summary(evaluate_scores(EvaluateOptions(by=by, **flags))))


@main.command("evaluate-repeats")
@click.option("--scores", "score_dirs", required=True, multiple=True, type=click.Path(),
              metavar="DIR", help="Score folder of one repeat run (e.g. another seed); repeat.")
@click.option("--outdir", default="graphics", show_default=True, type=click.Path(), metavar="DIR",
              help="Where repeats.xlsx and repeats.json go.")
@click.option("--normal-class", metavar="NAME", help="Normal class [the class labelled 0].")
@click.option("--anomaly-class", metavar="NAME|all",
              help="Anomaly class [mel when present, else all].")
def evaluate_repeats(score_dirs: tuple[str, ...], outdir: str, normal_class: str | None,
                     anomaly_class: str | None) -> None:
    """Mean ± s.d. of each method's validation and test AUC over repeat runs.

    \b
    Example:
      anostyle evaluate-repeats --scores run1/scores --scores run2/scores --outdir graphics
    """
    from pathlib import Path

    from anomaly.evaluation.evaluate import format_repeats, write_repeats

    stats, files = write_repeats([Path(d) for d in score_dirs], Path(outdir),
                                 normal_class=normal_class, anomaly_class=anomaly_class)
    click.echo(format_repeats(stats))
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


_report = config_option("anomaly.evaluation.report:ReportOptions")


@main.command("report")
@_report("--graphics", "graphics_dir", type=click.Path(), metavar="DIR",
         help="Folder of figures (evaluate --outdir).")
@_report("--title", type=str, help="Page title.")
def report(**flags) -> None:
    """Write DIR/index.html: one offline page with the summary table and every figure.

    Example: anostyle report --graphics graphics
    """
    from anomaly.evaluation.report import ReportOptions, write_report

    click.echo(f"wrote {write_report(ReportOptions(**flags))}")


# ---- train-encoder / reconstruct / project ---------------------------------------------------

@main.command("train-encoder")
@click.option("--network", required=True, type=click.Path(), metavar="PKL|CKPT",
              help="Trained GAN: official .pkl or AnoStyle .safetensors (G_ema and D are used).")
@click.option("--data", required=True, type=click.Path(), metavar="[ZIP|DIR]",
              help="Normal training images (train.zip from `anostyle prepare`).")
@click.option("--outdir", default="checkpointed", show_default=True, type=click.Path(),
              metavar="DIR", help="Where encoder checkpoints, rec grids and stats go.")
@click.option("--kimg", type=click.FloatRange(min=0, min_open=True),
              help="Training length in thousands of images [200].")
@click.option("--iters", type=click.IntRange(min=1), help="Training length in iterations.")
@_fit("--batch", type=click.IntRange(min=1),
              help="Images per iteration.")
@_fit("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (equalized-lr layers, as in StyleGAN).")
@_fit("--kappa", type=click.FloatRange(min=0),
              help="Weight of the discriminator-feature term (0: pixels only, no D needed).")
@click.option("--latent", type=click.Choice(["wplus", "w"]),
              help="Predict W+ (one code per layer) or one W [wplus, or the resumed encoder's].")
@_fit("--feature-layer", type=str, metavar="NAME",
              help="D features for the loss: b<res> (block outputs; b8 enters the 4x4 head), "
                   "b4.conv or b4.fc (these mix the batch through minibatch-stddev).")
@_fit("--w-reg", type=click.FloatRange(min=0),
              help="Weight of a pull of the codes towards W (normalised distance from w_avg).")
@click.option("--snap", type=click.IntRange(min=0),
              help="Iterations between checkpoints and rec grids (0: only at the end) [a sixth "
                   "of the run, at most 1000].")
@_fit("--tick", type=click.IntRange(min=1),
              help="Iterations between lines in stats.jsonl and log.txt.")
@click.option("--resume", metavar="latest|PATH",
              help="Continue from the newest checkpoint in --outdir, or from an encoder file.")
@click.option("--init", type=click.Path(), metavar="CKPT",
              help="Start a new run from this encoder's weights (warm start at iteration 0, "
                   "e.g. a model folder's encoder.safetensors for a new collection).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), metavar="M",
              help="Stop after M minutes of wall time, with a final checkpoint [--kimg decides].")
@_fit("--seed", type=int, help="Random seed.")
@_fit("--workers", type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@device_option("Where to train.")
@click.option("--cbase", type=click.IntRange(min=1),
              help="Encoder channels at resolution r: min(cbase / r, cmax) [as D].")
@click.option("--cmax", type=click.IntRange(min=1), help="Encoder max channels [as D].")
@_fit("--mirror", type=bool, metavar="BOOL",
              help="Train on x-flipped copies of the images too.")
@_fit("--rot90", type=bool, metavar="BOOL",
              help="Train on copies rotated by 90, 180 and 270 degrees too.")
@_fit("--scale-aug", type=click.FloatRange(0, 1), metavar="P",
      help="Probability of rescaling a training image about its centre by 2^N(0, 0.2^2) "
           "(ADA's scale op): an encoder for images framed more tightly or loosely.")
@click.option("--val", type=click.Path(), metavar="ZIP",
              help="val.zip: score each checkpoint on its normal images and name the best in "
                   "validation.json (the checkpoint to use).")
@_fit("--val-images", type=click.IntRange(min=1),
      help="Validation normals scored per checkpoint (a seeded subset).")
@click.option("-n", "--dry-run", is_flag=True, help="Print the resolved options and exit.")
def train_encoder(dry_run: bool, **flags) -> None:
    """Train an izif encoder (f-AnoGAN) for a frozen generator and discriminator.

    Loss = mean (x - G(E(x)))^2 + kappa * mean (f(x) - f(G(E(x))))^2, f = D features.
    Writes encoder-<iter>.safetensors (+ .state.pt), rec<iter>.png, stats.jsonl, log.txt and
    encoder_options.json to --outdir; with --val, validation.json names the checkpoint with the
    lowest loss on the validation naevi (use that one, not simply the last).

    \b
    Example:
      anostyle train-encoder --network network-snapshot-000200.safetensors \\
        --data prepared/train.zip --val prepared/val.zip --outdir checkpointed --kimg 200
    """
    import dataclasses
    import json

    from anomaly.model.fit import FitOptions, fit_encoder

    opts = FitOptions(**flags)
    if dry_run:
        click.echo(json.dumps({**dataclasses.asdict(opts), "total_iters": opts.total_iters()},
                              indent=2))
        return
    last = fit_encoder(opts)
    click.echo(f"encoder: {last}")
    if opts.val is not None:
        from anomaly.model.encoder_io import best_encoder

        best = best_encoder(opts.outdir)
        click.echo(f"chosen on validation loss: {best} (validation.json in {opts.outdir})")


@main.command("reconstruct")
@click.option("--network", type=click.Path(), metavar="PKL|CKPT",
              help="The GAN the encoder was trained for [--model's].")
@optional_encoder_option
@model_option
@click.option("--source", required=True, type=click.Path(), metavar="DIR|ZIP",
              help="Images: a prepared zip/folder or a plain folder of any-size images.")
@click.option("--outdir", default="generated_img", show_default=True, type=click.Path(),
              metavar="DIR", help="Where the reconstructions go (same names, as .png).")
@click.option("--residual", is_flag=True,
              help="Also write <name>_residual.png: |x - G(E(x))| in the inferno colour map, "
                   "fixed scale (black 0 .. pale yellow >= 0.5 in [-1, 1] units).")
@_rec("--batch", type=click.IntRange(min=1),
              help="Images per forward pass.")
@device_option("Where to compute.")
@click.option("--allow-mismatch", is_flag=True,
              help="Accept an encoder trained for another network file (a warning is printed).")
def reconstruct(**flags) -> None:
    """Reconstruct images through the encoder and generator: x -> G(E(x)).

    Raw images are fitted by the model's recorded preprocessing (as `prepare` fitted the
    training data); a prepared zip's reconstructions are named after their original images.
    Also writes reconstruction.csv (file, output, pixel MSE).

    \b
    Example:
      anostyle reconstruct --network net.safetensors \\
        --encoder checkpointed/encoder-012500.safetensors --source prepared/test.zip \\
        --outdir generated_img --residual
    """
    from anomaly.model.reconstruct import ReconstructOptions, reconstruct_folder

    _resolve_model(flags)
    summary = reconstruct_folder(ReconstructOptions(**flags))
    for name, reason in summary.skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    click.echo(f"wrote {summary.written} reconstructions to {summary.outdir} (mean MSE "
               f"{summary.mean_mse:.4g}); {summary.csv}")


@main.command("project")
@click.option("--network", required=True, type=click.Path(), metavar="PKL|CKPT",
              help="GAN to project into (needs D unless --kappa 0).")
@click.option("--source", required=True, type=click.Path(), metavar="DIR|ZIP",
              help="Images: a prepared zip/folder or a plain folder of any-size images.")
@click.option("--outdir", required=True, type=click.Path(), metavar="DIR",
              help="Where projected images and projection.csv go.")
@_proj("--steps", type=click.IntRange(min=0),
              help="Adam steps per image.")
@click.option("--encoder", type=click.Path(), metavar="CKPT",
              help="Start from the encoder's code [start from w_avg].")
@_proj("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate on the W+ codes.")
@_proj("--kappa", type=click.FloatRange(min=0),
              help="Weight of the discriminator-feature term.")
@_proj("--feature-layer", type=str, metavar="NAME",
              help="D features for the loss (see train-encoder --help).")
@_proj("--batch", type=click.IntRange(min=1),
              help="Images optimised together (each keeps its own code).")
@device_option("Where to compute.")
@click.option("--allow-mismatch", is_flag=True,
              help="Accept an encoder trained for another network file (a warning is printed).")
def project(**flags) -> None:
    """Project images into W+ by optimisation (AnoGAN-style): slow, sharp reference.

    Minimises mean (x - G(w))^2 + kappa * mean (f(x) - f(G(w)))^2 per image; writes the images
    (same names, .png) and projection.csv (final and initial loss per image).

    \b
    Example:
      anostyle project --network net.safetensors \\
        --encoder checkpointed/encoder-012500.safetensors --source some_images/ \\
        --steps 300 --outdir projected
    """
    from anomaly.model.project import ProjectOptions, project_folder

    summary = project_folder(ProjectOptions(**flags))
    for name, reason in summary.skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    click.echo(f"projected {summary.written} images to {summary.outdir} (mean loss "
               f"{summary.mean_initial_loss:.4g} -> {summary.mean_loss:.4g}); {summary.csv}")


# ---- tune ------------------------------------------------------------------------------------

_tune = config_option("anomaly.scoring.tune:TuneOptions")


@main.command("tune")
@click.option("--network", metavar="PKL|CKPT", help="Generator + discriminator [--model's].")
@optional_encoder_option
@model_option
@click.option("--data", required=True, type=click.Path(), metavar="ZIP",
              help="val.zip: the validation split (test.zip is refused and never opened).")
@click.option("--train", type=click.Path(), metavar="ZIP",
              help="train.zip whose naevi form the bank [beside --data].")
@click.option("--outdir", required=True, type=click.Path(), metavar="DIR",
              help="Where tune.xlsx, tune.json, detector.json and bank.safetensors go.")
@_tune("--grid", type=str, metavar="M,M,...", help="Methods to try (see `score --help`).")
@_tune("--tta", type=click.Choice(["off", "on", "both"]),
       help="Try each method without TTA, with TTA (8 rotations/flips), or both.")
@click.option("--normal-class", metavar="NAME", help="Normal class [the class labelled 0].")
@click.option("--anomaly-class", metavar="NAME|all",
              help="Anomaly class of the main comparison [mel when present, else all].")
@_tune("--select", type=str, metavar="auc|worst:COLUMN[+shifts]",
       help="Selection rule: validation AUC, or the worst AUC over the subgroups of normals by "
            "a manifest column (each vs all anomalies), e.g. worst:dx_type; with +shifts also "
            "the worst over the AUCs under the simulated --shifts of the validation images.")
@_tune("--shifts", type=str, metavar="SHIFT,SHIFT,...",
       help="Shifts of +shifts, each on a seeded half of the normals and of the anomalies: "
            "border:RADIUS, exposure:FACTOR, zoom:FACTOR (> 1 in, < 1 out).")
@click.option("--images", type=click.Path(), metavar="DIR",
              help="Raw images the data were prepared from, for +shifts [prepare.json's].")
@click.option("--by", multiple=True, metavar="COLUMN",
              help="Also report the AUC per subgroup of normals by this manifest column; "
                   "repeatable.")
@_tune("--tolerance", type=click.FloatRange(min=0),
       help="The cheapest configuration (no TTA before TTA, one score before a rank average) "
            "whose selection value is within this of the best is chosen.")
@_tune("--min-subgroup", type=click.IntRange(min=1),
       help="Smallest subgroup of normals counted by worst:COLUMN.")
@_tune("--threshold", type=str, metavar="youden|p95|VALUE",
       help="Decision threshold of the detector, chosen on validation.")
@_tune("--combine", type=click.IntRange(min=0),
       help="Also try rank averages of pairs of the N best configurations (0/1: none).")
@_tune("--bootstrap", type=click.IntRange(min=0), help="Lesion-level bootstrap resamples.")
@_tune("--seed", type=int, help="Seed of the bank subset and the bootstrap.")
@_tune("--bank-size", type=click.IntRange(min=2), help="Training naevi in the bank.")
@_tune("--dims", type=click.IntRange(min=1), help="PCA dimensions of each learned space.")
@_tune("--batch", type=click.IntRange(min=1), help="Images per forward pass.")
@device_option("Where to compute.")
@click.option("--allow-mismatch", is_flag=True,
              help="Accept an encoder trained for another network file (a warning is printed).")
def tune(by: tuple[str, ...], **flags) -> None:
    """Choose the scoring configuration on the validation split: tune.xlsx + detector.json.

    Every method of --grid, with and without TTA, is evaluated from ONE pass over val.zip
    (plus one pass over at most --bank-size training naevi for the k-NN/Mahalanobis bank);
    the cheapest within --tolerance of the best by --select becomes detector.json with its
    validation threshold (tune.xlsx marks it in the `chosen` column). Test data are
    never read; evaluate them once, afterwards, with `score --detector` + `evaluate`.

    \b
    Example:
      anostyle tune --model models/ham64 --data prepared/val.zip --outdir tuned \\
        --select worst:dx_type
    """
    from anomaly.scoring.tune import TuneOptions, tune as run_tune

    written = run_tune(TuneOptions(by=by, **flags))
    import json

    chosen = json.loads(written["detector"].read_text())
    sel = chosen["selection"]
    click.echo(f"chosen: {chosen['method']} for {chosen['comparison']} (validation "
               f"{sel['rule']} {sel['value']:.4f}; best "
               f"{sel['best_value']:.4f}, tolerance {sel['tolerance']:g}; threshold "
               f"{chosen['threshold']:.4g} {chosen['threshold_rule']})")
    click.echo(f"wrote {', '.join(str(p) for p in written.values())}")


# ---- adapt -----------------------------------------------------------------------------------

_adapt = config_option("anomaly.adapt:AdaptOptions")


@main.command("adapt")
@click.option("--model", required=True, type=click.Path(), metavar="DIR",
              help="The parent model folder (e.g. models/ham64-cpu).")
@click.option("--dest", required=True, type=click.Path(), metavar="DIR",
              help="The new model folder (e.g. models/mine); it must not exist yet.")
@click.option("--prepared", type=click.Path(), metavar="DIR",
              help="An already prepared collection (prepared with the parent's policy) instead "
                   "of --source.")
@collection_options(required=False)
@_adapt("--val", type=click.FloatRange(0, 1, max_open=True),
        help="Fraction of the normal images for val when the collection has no split "
             "(anomalies: val:test ratio).")
@_adapt("--test", type=click.FloatRange(0, 1, max_open=True),
        help="Fraction of the normal images for test when the collection has no split.")
@_adapt("--seed", type=click.IntRange(0, 2**32 - 1),
        help="Seed of the split, the bank subset, the bootstrap and the training runs.")
@_adapt("--train-anomalies", type=click.Choice(["reject", "val"]),
        help="Abnormal images given the train split join val (training uses normals only), or "
             "are rejected.")
@_adapt("--kimg", type=click.FloatRange(min=0),
        help="Fine-tune the GAN from the parent's network for N kimg on the training normals "
             "(0: keep the parent's network).")
@_adapt("--encoder-kimg", type=click.FloatRange(min=0),
        help="Train the encoder from the parent's for N kimg, checkpoint chosen on the "
             "validation normals (0: keep the parent's encoder).")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), metavar="M",
              help="Time budget: the training steps stop in time for the whole run to take "
                   "about M minutes (the split is printed) [no limit].")
@_adapt("--grid", type=str, metavar="M,M,...", help="Methods to try (see `tune --help`).")
@_adapt("--select", type=str, metavar="auc|worst:COLUMN",
        help="Selection rule of `tune` (a simpler one is used, and said, where the validation "
             "split is too small for it).")
@_adapt("--tolerance", type=click.FloatRange(min=0),
        help="The cheapest configuration within this of the best selection value is chosen.")
@click.option("--by", multiple=True, metavar="COLUMN",
              help="Also report validation AUCs per subgroup of normals by this column.")
@_adapt("--min-subgroup", type=click.IntRange(min=1),
        help="Smallest subgroup of normals counted by worst:COLUMN.")
@click.option("--normal-class", metavar="NAME", help="Normal class [the class labelled 0].")
@click.option("--anomaly-class", metavar="NAME|all",
              help="Anomaly class of the main comparison [mel when present, else all].")
@_adapt("--threshold", type=str, metavar="youden|p95|VALUE",
        help="Decision threshold, chosen on validation.")
@_adapt("--bootstrap", type=click.IntRange(min=0), help="Lesion-level bootstrap resamples.")
@_adapt("--bank-size", type=click.IntRange(min=2), help="Training normals in the bank.")
@click.option("--no-test", is_flag=True,
              help="Do not read the test split (otherwise it is read once, at the end).")
@_adapt("--batch", type=click.IntRange(min=1), help="Images per forward pass.")
@device_option("Where to compute.")
def adapt(no_test: bool, **flags) -> None:
    """Your own collection: a tuned model folder from a parent model folder, in one command.

    Steps: prepare the collection with the parent's preprocessing (or take --prepared), fine-tune
    the GAN and the encoder if asked (--kimg, --encoder-kimg), choose the scoring configuration on
    the collection's validation split with its training normals as the bank, write the model
    folder (network, encoder, detector.json, bank, splits.csv, tune.xlsx, README.md model card),
    and read the test split once, at the end, into DEST/evaluation. A killed run continues when
    the same command is given again.

    \b
    Example:
      anostyle adapt --model models/ham64-cpu --dest models/mine --source my/images \\
        --labels my/labels.csv --id-column image --label-column diagnosis \\
        --split-column split --normal nevus --anomaly-class melanoma
    """
    import shlex
    import sys

    from anomaly.adapt import AdaptOptions, adapt as run_adapt

    command = "anostyle " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_adapt(AdaptOptions(read_test=not no_test, **flags), command=command, echo=click.echo)


# ---- score / tsne ----------------------------------------------------------------------------

@main.command("score")
@click.option("--network", metavar="PKL|CKPT", help="Generator + discriminator file [--model's].")
@optional_encoder_option
@model_option
@click.option("--detector", type=click.Path(), metavar="JSON",
              help="detector.json from `anostyle tune`: also writes detector.xlsx with its "
                   "method [--model's detector.json].")
@click.option("--tta", is_flag=True,
              help="Average every method over the 8 rotations/flips (sheets named <method>@tta).")
@click.option("--train", type=click.Path(), metavar="ZIP",
              help="train.zip: the naevi bank of k-NN/Mahalanobis/dfeat-res methods that "
                   "--detector's bank lacks.")
@click.option("--data", "data", required=True, multiple=True, metavar="ZIP",
              help="Prepared val.zip / test.zip (repeat the flag for several).")
@_score("--methods", type=str,
        help="Comma-separated: izif, sklearn:<metric>, torch-euclidean, latent, residual:mean|"
             "p99|smax[:SIGMA], izif:KAPPA, dfeat-res:b8+b16, knn-latent:K, maha-latent, "
             "knn-dfeat:LAYER:K, maha-dfeat:LAYER (see the README).")
@click.option("--kappa", type=click.FloatRange(min=0),
              help="Weight of the feature residual in izif [the encoder's training kappa].")
@click.option("--feature-layer", help="D layer for izif features [the encoder's, e.g. b8].")
@_score("--batch", type=click.IntRange(min=1))
@click.option("--heatmaps", metavar="DIR",
              help="Also write residual heatmaps of the most anomalous test images here.")
@_score("--num-heatmaps", type=click.IntRange(min=1))
@click.option("--outdir", required=True, metavar="DIR", help="Where the .xlsx sheets go.")
@device_option("Where to compute.")
@click.option("--allow-mismatch", is_flag=True,
              help="Accept an encoder trained for another network file (a warning is printed).")
def score(data: tuple[str, ...], **kwargs) -> None:
    """Anomaly scores of every image -> one Excel sheet per method (+ all_scores.xlsx).

    Columns: score, label (0 normal, 1 anomaly), file, class, split. Higher is more anomalous.
    """
    from anomaly.scoring.score import ScoreOptions, score_datasets

    detector = _resolve_model(kwargs)
    kwargs["detector"] = kwargs["detector"] or detector
    written = score_datasets(ScoreOptions(data=tuple(data), **kwargs))
    click.echo(f"wrote {len(written)} files to {kwargs['outdir']}"
               + (f" and heatmaps to {kwargs['heatmaps']}" if kwargs["heatmaps"] else ""))


@main.command("tsne")
@click.option("--network", metavar="PKL|CKPT", help="Generator file [--model's].")
@optional_encoder_option
@model_option
@click.option("--data", "data", required=True, multiple=True, metavar="ZIP",
              help="Prepared zips to embed (repeat the flag for several).")
@click.option("--outdir", default="graphics", show_default=True, metavar="DIR")
@_tsne("--perplexity", type=click.FloatRange(min=1))
@_tsne("--seed", type=int)
@_tsne("--batch", type=click.IntRange(min=1))
@click.option("--max-images", type=click.IntRange(min=5), help="Subsample above this many images.")
@device_option("Where to compute.")
@click.option("--allow-mismatch", is_flag=True,
              help="Accept an encoder trained for another network file (a warning is printed).")
def tsne(data: tuple[str, ...], **kwargs) -> None:
    """t-SNE of the encoder's latent codes coloured by class: tsne.png + tsne.xlsx."""
    from anomaly.scoring.score import TsneOptions, tsne_latents

    _resolve_model(kwargs)
    written = tsne_latents(TsneOptions(data=tuple(data), **kwargs))
    click.echo(f"wrote {written['plot']} and {written['sheet']}")


# ---- serve -----------------------------------------------------------------------------------

@main.command("serve")
@model_option
@click.option("--detector", type=click.Path(), metavar="JSON",
              help="detector.json from `anostyle tune`, with --network/--encoder "
                   "[--model's detector.json].")
@click.option("--network", type=click.Path(), metavar="PKL|CKPT",
              help="The GAN the encoder was trained for (D is needed unless --kappa 0) "
                   "[--model's].")
@optional_encoder_option
@click.option("--summary", type=click.Path(), metavar="JSON",
              help="izif mode: graphics/summary.json from `anostyle evaluate` (the izif "
                   "threshold); not with a detector.")
@click.option("--scores", type=click.Path(), metavar="DIR",
              help="izif mode: folder with izif.xlsx for the percentile among validation naevi "
                   "[the scores folder summary.json records].")
@_serve("--host", type=str,
        help="Address to listen on; anything but loopback needs --token or --no-auth.")
@_serve("--port", type=click.IntRange(0, 65535), help="TCP port (0: any free port).")
@click.option("--token", metavar="TEXT",
              help="Login token (>= 16 characters) [ANOSTYLE_TOKEN]: the API wants "
                   "'Authorization: Bearer TOKEN', the page a login form.")
@click.option("--no-auth", is_flag=True,
              help="Serve off loopback without a login (behind a firewall or a proxy's login).")
@click.option("--allowed-hosts", metavar="NAMES",
              help="Comma-separated Host names clients use ('*': any) [loopback names on "
                   "loopback, else this machine's names].")
@click.option("--proxy", metavar="ADDRS",
              help="Address(es) of a reverse proxy whose X-Forwarded-Proto/-For are trusted.")
@_access("--header-timeout", type=click.FloatRange(0, min_open=True),
         help="Seconds a client has to send its request headers.")
@_access("--request-timeout", type=click.FloatRange(0, min_open=True),
         help="Seconds for one request's upload, decoding and scoring (408/503 after).")
@_serve("--max-upload-mb", type=click.FloatRange(0, 1024, min_open=True),
        help="Largest request body (all images of one request together).")
@_serve("--max-pixels", type=click.IntRange(min=1),
        help="Largest width x height, read from the header (6000 x 4000 dermoscopy).")
@_access("--max-decoded-mb", type=click.FloatRange(0, min_open=True),
         help="Decoded image bytes per request (width x height x bytes per pixel, summed).")
@_serve("--max-files", type=click.IntRange(min=1),
              help="Images per request.")
@click.option("--kappa", type=click.FloatRange(min=0),
              help="izif mode: weight of the feature term [score.json's, else the encoder's "
                   "training kappa].")
@click.option("--feature-layer", metavar="NAME",
              help="izif mode: D layer of the izif features [score.json's, else the encoder's].")
@click.option("--threads", type=click.IntRange(min=1), help="Torch CPU threads [min(4, cores)].")
@click.option("--allow-mismatch", is_flag=True,
              help="Serve an encoder trained for another network file (a warning in answers).")
@device_option("Where to compute.")
def serve(token, no_auth, allowed_hosts, proxy, header_timeout, request_timeout, max_decoded_mb,
          **flags) -> None:
    """Web page and JSON API that score uploaded images (score, percentile, decision).

    With --model DIR (or --detector JSON) the tuned detector of `anostyle tune` answers: its
    score, its validation threshold and the percentile among its validation naevi, all from
    detector.json (--summary, --scores, --kappa and --feature-layer are refused). Without,
    izif answers, with the threshold of --summary. The model loads once; images are fitted
    by the model's recorded preprocessing, scored in memory and never stored. Open the
    printed address in a browser, or POST images from a script:

    \b
      curl -F image=@lesion.jpg -F image=@other.png http://127.0.0.1:8000/api/score
    \b
    Answers {"results": [{name, model, method, score, pixel_term, feature_term, percentile,
    decision, threshold, threshold_rule, warnings, images: {input, reconstruction,
    residual}}, ...]} (PNG data URLs; add ?images=false to leave them out; a detector gives
    null izif terms). GET /healthz answers {"status": "ok"}. Off loopback, give a token
    (curl -H "Authorization: Bearer $TOKEN").

    \b
    Examples:
      anostyle serve --model models/ham64-cpu
      anostyle serve --network net.safetensors \\
        --encoder checkpointed/encoder-012500.safetensors --summary graphics/summary.json
    """
    from anomaly.app.access import AccessOptions

    try:
        from anomaly.app.model import ServeOptions
        from anomaly.app.server import run_server
    except ImportError as exc:  # the `web` extra is optional
        raise UserError(f"`anostyle serve` needs the web packages (missing {exc.name}); install "
                        f"them with: pip install 'anostyle[web]'.") from None
    hosts = tuple(h.strip() for h in (allowed_hosts or "").split(",") if h.strip())
    access = AccessOptions(token=token, no_auth=no_auth, allowed_hosts=hosts, proxy=proxy,
                           header_timeout=header_timeout, request_timeout=request_timeout,
                           max_decoded_mb=max_decoded_mb)
    run_server(ServeOptions(**flags), access, announce=click.echo)

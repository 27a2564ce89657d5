"""The `anostyle` command line: a thin click group; each command parses, validates and calls
one library function. Mistakes a user can fix (`UserError`) end in one sentence, no traceback."""

from __future__ import annotations

import click

from stylegan.errors import UserError


class _Group(click.Group):
    """Click group that turns `UserError` into a one-line error message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anostyle")
def main() -> None:
    """AnoStyle: unsupervised anomaly detection in dermoscopy with StyleGAN2-ADA and an izif encoder.

    Typical order: prepare -> train-gan -> train-encoder -> reconstruct -> score -> tsne ->
    evaluate -> report. Every command has --help.
    """


# Commands follow, one section each, in workflow order. Keep each command thin.


# ---- train-gan -------------------------------------------------------------------------------

@main.command("train-gan")
@click.option("--outdir", required=True, metavar="DIR", help="Where to make the run folder.")
@click.option("--data", required=True, metavar="[ZIP|DIR]", help="Training data (train.zip).")
@click.option("--cfg", default="auto", show_default=True,
              type=click.Choice(["stylegan2", "paper256", "auto", "cpu"]),
              help="Preset; explicit flags override it. 'cpu': small 64 px net for 2 CPU cores.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="Number of processes (GPUs; on CPU, gloo processes).")
@click.option("--batch", type=click.IntRange(min=1), help="Total batch size [preset].")
@click.option("--batch-gpu", type=click.IntRange(min=1), help="Batch per process [batch/gpus].")
@click.option("--gamma", type=click.FloatRange(min=0), help="R1 regularization weight [preset].")
@click.option("--map-depth", type=click.IntRange(min=1), help="Mapping network depth [preset].")
@click.option("--glr", type=click.FloatRange(min=0), help="G learning rate [preset].")
@click.option("--dlr", type=click.FloatRange(min=0), help="D learning rate [preset].")
@click.option("--cbase", type=click.IntRange(min=1), help="Capacity multiplier [preset].")
@click.option("--cmax", type=click.IntRange(min=1), help="Max. feature maps [preset].")
@click.option("--kimg", default=25000, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Total training length in thousands of images.")
@click.option("--tick", default=4, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="How often to print progress, in kimg.")
@click.option("--snap", default=50, show_default=True, type=click.IntRange(min=0),
              help="How often to save snapshots, in ticks (0: only at the end).")
@click.option("--workers", default=3, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes.")
@click.option("--resume", metavar="[PKL|CKPT|latest]",
              help="Resume or fine-tune from an official .pkl, our snapshot, or 'latest' in --outdir.")
@click.option("--strict-resume", is_flag=True,
              help="Refuse a --resume file whose architecture differs from the flags.")
@click.option("--mirror", default=False, show_default=True, type=bool, metavar="BOOL",
              help="Enable dataset x-flips.")
@click.option("--aug", default="ada", show_default=True, type=click.Choice(["ada", "fixed", "noaug"]),
              help="Augmentation mode.")
@click.option("--p", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Augmentation probability for --aug=fixed (ada starts at 0 and adapts).")
@click.option("--target", default=0.6, show_default=True, type=click.FloatRange(0, 1),
              help="Target value for --aug=ada.")
@click.option("--freezed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Freeze the first N layers of D.")
@click.option("--mbstd-group", type=click.IntRange(min=1), help="Minibatch std group size [preset].")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option("--fp32", default=False, show_default=True, type=bool, metavar="BOOL",
              help="Disable mixed precision (CUDA only; CPU always computes in float32).")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train.")
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


@main.command("prepare")
@click.option("--source", required=True, type=click.Path(), metavar="DIR",
              help="Raw images: DIR/<class>/*, DIR/{train,val,test}/<class>/*, or any folder "
                   "(searched recursively) with --labels.")
@click.option("--labels", type=click.Path(), metavar="CSV",
              help="Metadata CSV with one row per image (e.g. HAM10000_metadata.csv).")
@click.option("--id-column", metavar="C",
              help="CSV column with the image file stem/name [image_id, image or isic_id].")
@click.option("--label-column", metavar="C", help="CSV column with the class name (e.g. dx).")
@click.option("--group-column", metavar="C",
              help="CSV column grouping images for splits (e.g. lesion_id) [each image alone].")
@click.option("--onehot-columns", callback=_comma_list, metavar="A,B,..",
              help="CSV one-hot class columns instead of --label-column (e.g. MEL,NV,BCC).")
@click.option("--onehot-zero-class", metavar="NAME",
              help="Class of rows whose one-hot columns are all 0 (e.g. nevus for ISIC 2017).")
@click.option("--normal", required=True, callback=_comma_list, metavar="CLASS[,CLASS]",
              help="Normal class(es): label 0, the only ones in train.zip (e.g. nv).")
@click.option("--dest", required=True, type=click.Path(), metavar="DIR",
              help="Output folder for train/val/test.zip, manifest.csv, rejected.csv.")
@click.option("--resolution", default=256, show_default=True, type=int,
              help="Output size in pixels (a power of two).")
@click.option("--transform", default="center-crop", show_default=True,
              type=click.Choice(["center-crop", "resize", "pad"]),
              help="How to make images square: crop the middle, stretch, or pad with black.")
@click.option("--resize-filter", default="box", show_default=True,
              type=click.Choice(["box", "lanczos"]), help="Resampling filter (box is fast).")
@click.option("--channels", default="3", show_default=True, type=click.Choice(["3", "1"]),
              help="3: RGB PNGs; 1: grayscale PNGs.")
@click.option("--val", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the normal images for val (abnormal: val:test ratio).")
@click.option("--test", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the normal images for test.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seed of the grouped random split.")
@click.option("--max-per-class", type=click.IntRange(min=1), metavar="N",
              help="Use at most N images per class (whole groups, seeded) [all].")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Decoding processes [number of CPUs].")
@click.option("--strict", is_flag=True, help="Exit with status 1 if any input was rejected.")
def prepare(channels: str, **flags) -> None:
    """Build NVlabs-compatible train/val/test zips from raw dermoscopy images.

    train.zip holds normal images only (label 0); val.zip and test.zip hold every class
    (1..k: the other classes sorted by name). Splits are grouped, so a lesion never sits in two
    splits. Inputs that cannot be used are listed with the reason in DEST/rejected.csv.

    \b
    Example (HAM10000):
      anostyle prepare --source ham10000/images --labels ham10000/HAM10000_metadata.csv \\
        --id-column image_id --label-column dx --group-column lesion_id --normal nv \\
        --dest prepared --resolution 256
    """
    from stylegan.prepare import PrepareOptions, format_summary, prepare_dataset

    options = PrepareOptions(channels=int(channels), **flags)
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


@main.command("generate")
@click.option("--network", required=True, type=click.Path(), metavar="PKL|CKPT",
              help="Official .pkl or AnoStyle .safetensors network (G_ema is used when present).")
@click.option("--seeds", required=True, metavar="LIST",
              help="Seeds and inclusive ranges, e.g. 0-7,12 (latent = RandomState(seed).randn).")
@click.option("--trunc", "truncation_psi", default=1.0, show_default=True, type=float,
              help="Truncation psi (1: none).")
@click.option("--noise-mode", default="const", show_default=True,
              type=click.Choice(["const", "random", "none"]), help="Per-pixel noise input.")
@click.option("--class", "class_idx", type=click.IntRange(min=0), metavar="IDX",
              help="Class index; required for conditional networks.")
@click.option("--outdir", required=True, type=click.Path(), metavar="DIR",
              help="Where to write seedNNNN.png and grid.png.")
@click.option("--batch", "batch_size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def generate(seeds: str, **flags) -> None:
    """Generate images for the given seeds, as NVlabs gen_images.py does.

    Example: anostyle generate --network network-snapshot-000200.safetensors --seeds 0-15
    --trunc 0.7 --outdir out/
    """
    from stylegan.generate import generate_images, parse_seeds

    written = generate_images(seeds=parse_seeds(seeds), **flags)
    click.echo(f"wrote {len(written) - 1} images and {written[-1]}")


# ---- evaluate / report -----------------------------------------------------------------------

@main.command("evaluate")
@click.option("--scores", "scores_dir", required=True, type=click.Path(), metavar="DIR",
              help="Folder of <method>.xlsx score sheets written by `anostyle score`.")
@click.option("--outdir", default="graphics", show_default=True, type=click.Path(), metavar="DIR",
              help="Where figures, summary.xlsx and summary.json go.")
@click.option("--normal-class", metavar="NAME",
              help="Normal class name [the class labelled 0, e.g. nv].")
@click.option("--anomaly-class", metavar="NAME",
              help="Main anomaly class [mel when present]; then normal vs rest, vs each class.")
@click.option("--threshold", default="youden", show_default=True, metavar="youden|p95|VALUE",
              help="Decision threshold, chosen on the val split only and applied to test.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples for the AUC 95% CI (0: none).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the bootstrap.")
@click.option("--baseline", default="knn-pixels", show_default=True,
              type=click.Choice(["knn-pixels", "none"]),
              help="Also score and evaluate a k-NN detector on 16x16 pixels (needs the dataset).")
@click.option("--prepared", type=click.Path(), metavar="DIR",
              help="Prepared dataset folder for the baseline [the 'prepared' entry of "
                   "DIR/score.json].")
def evaluate(**flags) -> None:
    """ROC/AUC (bootstrap CI), PR, confusion matrices, violin plots, classification reports.

    Every <method>.xlsx in --scores is evaluated on its test rows: normal vs the anomaly class,
    normal vs all other classes, and normal vs each class.

    \b
    Example:
      anostyle evaluate --scores scores --outdir graphics --prepared prepared
    """
    from anomaly.evaluate import EvaluateOptions, evaluate_scores, format_summary

    click.echo(format_summary(evaluate_scores(EvaluateOptions(**flags))))


@main.command("report")
@click.option("--graphics", "graphics_dir", default="graphics", show_default=True,
              type=click.Path(), metavar="DIR", help="Folder of figures (evaluate --outdir).")
@click.option("--title", default="AnoStyle results", show_default=True, help="Page title.")
def report(graphics_dir: str, title: str) -> None:
    """Write DIR/index.html: one offline page with the summary table and every figure.

    Example: anostyle report --graphics graphics
    """
    from anomaly.report import write_report

    click.echo(f"wrote {write_report(graphics_dir, title=title)}")

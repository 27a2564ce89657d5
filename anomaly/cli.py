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

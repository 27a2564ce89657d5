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

"""Option defaults are written once: in the config dataclasses, which the click options read."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from click.testing import CliRunner

from anomaly.cli import _ConfigOption, main

# Each command with its options dataclass(es), "module:Class" separated by spaces.
COMMANDS = {
    "train-gan": "stylegan.options:TrainFlags",
    "prepare": "anodata.prepare:PrepareOptions",
    "generate": "stylegan.generate:GenerateOptions",
    "reference": "anomaly.evaluation.reference.run:ReferenceOptions",
    "evaluate": "anomaly.evaluation.evaluate:EvaluateOptions",
    "report": "anomaly.evaluation.report:ReportOptions",
    "train-encoder": "anomaly.model.fit:FitOptions",
    "reconstruct": "anomaly.model.reconstruct:ReconstructOptions",
    "project": "anomaly.model.project:ProjectOptions",
    "tune": "anomaly.scoring.tune:TuneOptions",
    "adapt": "anomaly.adapt:AdaptOptions",
    "score": "anomaly.scoring.score:ScoreOptions",
    "tsne": "anomaly.scoring.score:TsneOptions",
    "serve": "anomaly.app.model:ServeOptions anomaly.app.access:AccessOptions",
}
# Commands without an options dataclass, whose defaults live in their click options only:
# convert has none; evaluate-repeats has --outdir, which `write_repeats` requires.
WITHOUT_DATACLASS = {"convert", "evaluate-repeats"}
# Written in the click option on purpose: a string Choice for an int field, and the --device
# option shared by the commands that compute (generate's own --device reads its dataclass).
EXEMPT = {("prepare", "channels"), *((c, "device") for c in COMMANDS if c != "generate")}


def test_every_command_is_checked():
    unlisted = sorted(set(main.commands) - set(COMMANDS) - WITHOUT_DATACLASS)
    assert not unlisted, f"add {unlisted} to COMMANDS (or, without a dataclass, WITHOUT_DATACLASS)"
    assert set(COMMANDS) | WITHOUT_DATACLASS <= set(main.commands), "a listed command is gone"
    assert not set(COMMANDS) & WITHOUT_DATACLASS


@pytest.mark.parametrize("command, configs", COMMANDS.items())
def test_every_defaulted_field_is_read_from_its_dataclass(command, configs):
    fields = {}
    for config in configs.split():  # "module:Class", or several separated by spaces
        module, cls = config.split(":")
        fields.update({f.name: f for f in
                       dataclasses.fields(getattr(importlib.import_module(module), cls))})
    for param in main.commands[command].params:
        field = fields.get(param.name)
        if field is None or field.default in (dataclasses.MISSING, None, False, ()) \
                or (command, param.name) in EXEMPT or getattr(param, "is_flag", False):
            continue
        assert isinstance(param, _ConfigOption), f"{command} --{param.name} writes its default twice"
        assert param.default == field.default


def test_a_list_default_is_read_shown_and_parsed_as_typed():
    command = main.commands["evaluate"]
    ctx = command.make_context("evaluate", ["--scores", "s", "--knn-bins", "3,2"])
    assert ctx.params["knn_sizes"] == (8, 16, 32) and ctx.params["knn_bins"] == (3, 2)
    help_text = CliRunner().invoke(main, ["evaluate", "--help"], terminal_width=200).output
    assert "tried on val.  [default: 8,16,32]" in help_text
    bad = CliRunner().invoke(main, ["evaluate", "--scores", "s", "--knn-bins", "4,x"])
    assert bad.exit_code == 1 and "Error: --knn-bins '4,x' is not a list of positive" in bad.output


def test_the_lesion_max_side_bound_in_prepare_help_is_the_policy_s():
    """The CLI stays free of anodata imports at start-up, so its help writes the bound out;
    the policy's check (LESION_MAX_SIDE) is what enforces it."""
    from anodata.policy import LESION_MAX_SIDE

    text = " ".join(CliRunner().invoke(main, ["prepare", "--help"]).output.split())
    assert f"(at most {LESION_MAX_SIDE:g})" in text

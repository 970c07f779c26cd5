"""`--help` of the commands with many options is grouped by subject: one section per group, in the order the
config declares (HELP_GROUPS), every option in exactly one section; an option without a group is refused."""
from __future__ import annotations

import re
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from dfkd.common.clihelp import GroupedCommand, grouped_option
from dfkd.common.options import click_options, option, options_of
from dfkd.distill.cli import main as distill_cli
from dfkd.distill.config import TrainConfig
from dfkd.distill.teacher import TeacherConfig
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig

COMMANDS = [(distill_cli, "train", TrainConfig), (synth_cli, "generate", GenerateConfig),
            (distill_cli, "teacher", TeacherConfig)]


def help_sections(text: str) -> dict[str, list[str]]:
    """{heading: the first flag of each option listed under it}, from a click help page."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.fullmatch(r"(\S.*):", line)
        if heading and not line.startswith("Usage:"):
            current = sections.setdefault(heading.group(1), [])
        elif current is not None and re.match(r"  -", line):
            current.append(re.match(r"  (-[\w-]+)", line).group(1))
    return sections


@pytest.mark.parametrize("cli, name, config", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_help_is_grouped_by_subject_and_lists_every_option_once(cli, name, config):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    sections = help_sections(result.output)
    assert list(sections) == list(config.HELP_GROUPS)  # every group in its order, no flat "Options" list
    listed = [flag for flags in sections.values() for flag in flags]
    command = cli.commands[name]
    expected = [p.opts[0] for p in command.params if isinstance(p, click.Option)] + ["-h"]
    assert sorted(listed) == sorted(expected) and len(listed) == len(set(listed))
    for spec in options_of(config):  # each declared option under the group its declaration names
        if spec.cli:
            assert spec.flag_name in sections[spec.group], (spec.name, spec.group)


@pytest.mark.parametrize("config", [c[2] for c in COMMANDS], ids=[c[1] for c in COMMANDS])
def test_every_command_line_option_declares_one_of_its_configs_groups(config):
    for spec in options_of(config):
        if spec.cli:
            assert spec.group in config.HELP_GROUPS, f"{config.__name__}.{spec.name}: group {spec.group!r}"


def test_an_option_without_a_group_is_refused_when_the_command_is_built():
    @dataclass
    class Config:
        HELP_GROUPS = ("Main",)
        size: int = option(1, help="Size.", group="Main")
        speed: int = option(2, help="Speed.")
    with pytest.raises(TypeError, match=r"Config.speed has no help group"):
        click_options(Config)

    def command(**kwargs):
        pass
    with pytest.raises(TypeError, match="option --plain of command 'x' has no help group"):
        GroupedCommand("x", callback=command, groups=("Main",), params=[click.Option(["--plain"])])
    with pytest.raises(TypeError, match="option --typo of command 'x' has no help group"):
        click.command("x", cls=GroupedCommand, groups=("Main",))(grouped_option("--typo", group="Mian")(command))
    built = click.command("x", cls=GroupedCommand, groups=("Main", "Other"))(
        grouped_option("--b", group="Other", help="B.")(grouped_option("--a", group="Main", help="A.")(command)))
    text = CliRunner().invoke(built, ["--help"]).output
    assert help_sections(text) == {"Main": ["--a"], "Other": ["--b", "--help"]}  # --help in the last group

"""`--help` grouped by subject (as timm's argument groups): click has no option groups, so a command of
class GroupedCommand writes one section per group, in the order it is given, each listing the options of
that group in their order.

    @click.command(cls=GroupedCommand, groups=("Input and output", "Execution"))
    @grouped_option("--out", group="Input and output", help="...")
    @grouped_option("--quiet", group="Execution", is_flag=True, help="...")

Every option of such a command names its group, one of `groups` (TypeError when the command is built,
so that a new option cannot be added without one); `--help` itself goes into the last group. The
options declared with common.options.option(group=...) get theirs from `click_options`.
"""
from __future__ import annotations

from typing import Any, Sequence

import click


class GroupedOption(click.Option):
    """A click option that belongs to a group of the `--help` page."""

    def __init__(self, *decls: Any, group: str, **attrs: Any) -> None:
        super().__init__(*decls, **attrs)
        self.group = group


def grouped_option(*decls: str, group: str, **attrs: Any):
    """`click.option(*decls, **attrs)` in the help group `group`."""
    return click.option(*decls, cls=GroupedOption, group=group, **attrs)


class GroupedCommand(click.Command):
    """A click command whose `--help` lists its options in one section per group (see the module docstring)."""

    def __init__(self, *args: Any, groups: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = tuple(groups)
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise TypeError(f"command {self.name!r}: groups must be distinct and not empty, got {self.groups}")
        for param in self.params:
            if isinstance(param, click.Option) and getattr(param, "group", None) not in self.groups:
                raise TypeError(f"option {param.opts[0]} of command {self.name!r} has no help group: declare it with "
                                f"group= one of {', '.join(self.groups)}")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {group: [] for group in self.groups}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:  # arguments and hidden options have none
                sections[getattr(param, "group", self.groups[-1])].append(record)
        for group, records in sections.items():
            if records:
                with formatter.section(group):
                    formatter.write_dl(records)

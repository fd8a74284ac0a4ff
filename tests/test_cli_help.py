"""Every flag of every command says what it does and, where it has one, its default (the first hour of a new
user is spent reading --help)."""
from __future__ import annotations

import argparse

import pytest

from services.cli import build_parser


def commands(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))
    yield path, parser


@pytest.mark.parametrize("command", ["generate", "serve", "service", "bench"])
def test_every_flag_has_help_and_shows_its_default(command):
    for path, parser in commands(build_parser(command)):
        if not path or path[0] != command:
            continue
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help text"
            text = formatter._expand_help(action)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in text, f"{' '.join(path)} {action.option_strings[0]}: no default in {text!r}"

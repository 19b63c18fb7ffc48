"""What every `schedsearch` subcommand module shares: the error class of bad command-line input, the help formatter,
the default model. Light on purpose (argparse and schedsearch.errors only): `--help` imports it."""

from __future__ import annotations

import argparse

from schedsearch.errors import UserInputError

DEFAULT_MODEL = "builtin:mnist-dit"
MODEL_HELP = ("'builtin:mnist-dit' or 'builtin:mnist-flow' (shipped) or 'diffusers:<local pipeline dir or cached "
              "hub id>'")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one; a flag or an option whose default the help text explains shows none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CliError(UserInputError):
    """Bad input at the command line: printed as `error: ...`, exit code 2."""

"""The command line's argument parser: no abbreviated options, one-line usage errors that suggest the
nearest flag or command, and the exit codes every command shares.

Exit codes: 0 success; 1 an error in what the user gave (a file, a value, a model that does not fit),
printed as one line; 2 a usage error (unknown command or option, a missing or malformed argument);
130 interrupted (Ctrl-C)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit status: 0 success; 1 an error in the input (one line on stderr); "
              "2 a usage error (unknown or malformed option); 130 interrupted")


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--max-new-token` is an error, not `--max-new-tokens`), whose
    errors are one line plus a "did you mean" when a known flag or command is close."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hint = self._suggestion(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{hint} (see {self._command()} --help)\n")

    def _command(self) -> str:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word in self._argv:
                    if word in action.choices:
                        return action.choices[word].prog
        return self.prog

    def _suggestion(self, message: str) -> str:
        m = re.search(r"invalid choice: '([^']*)'", message)
        if m:
            choices = [str(c) for a in self._actions for c in (a.choices or [])]
            return _did_you_mean(m.group(1), choices)
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            for word in m.group(1).split():
                if word.startswith("-"):
                    hint = _did_you_mean(word.split("=", 1)[0], self._known_options())
                    if hint:
                        return hint
        return ""

    def _known_options(self) -> list[str]:
        """This parser's option strings and those of the subcommand named on the command line."""
        options = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word in self._argv:
                    if word in action.choices:
                        return options + list(action.choices[word]._option_string_actions)
        return options


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""

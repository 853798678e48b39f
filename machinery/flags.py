"""How every script reads its flags: typed dataclasses -> --key value (or --key=value), checked once.

    cfg, dcfg, mcfg, wcfg = parse_config(argv, [TrainConfig, DataConfig, ModelConfig], recipes.recipe, __doc__)

  parse_config   one flag per dataclass field, converted by the field's type (--epochs=1e4 is an error, --lr=1 is 1.0;
                 dict fields take JSON), unknown keys refused; --help shows each field's trailing comment, its allowed
                 values and the value that will run, naming the recipe that sets it (machinery/recipes.py)
  check_fields   what a config's __post_init__ calls: each field's value checked once, when the flags are read; a
                 config's CHOICES ({field: allowed values}) are checked and listed in --help from the same tuple
  UsageError     a user's mistake: one message naming the flag and what to do; cli() prints it alone and exits
                 with status 2, while any other exception is a bug and keeps its traceback

Why not transformers.HfArgumentParser: it takes help texts only from field(metadata={"help": ...}), which would
double the length of every config class and move the help away from the one-line trailing comment each field
carries; it cannot parse dict fields (ModelConfig.text_config: `--text_config={"hidden_size": 64}` is "invalid dict
value"); and presets still need the two-pass parse below. This file imports nothing from the project.
"""

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
from collections.abc import Callable

# -----------------------------------------------------------------------------
# user errors: one message, exit status 2


class UsageError(ValueError):
    """The user asked for something impossible (a flag's value, a file, a folder): the message names it and says
    what to do. cli() prints it alone; any other exception is a bug and keeps its traceback. A ValueError, so that
    the configs' __post_init__ checks (check_fields) are usage errors for parse_config too."""


def cli(main) -> None:
    """Run a script's main() from the command line: a UsageError is printed once (by rank 0 under torchrun; every
    rank stops) as `error: <message>`, and the exit status is 2, as for a bad flag. main(argv) itself raises, so
    tests call it directly."""
    try:
        main()
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def check_fields(cfg, rules: list[tuple[str, bool, str]] = ()) -> None:
    """For a config's __post_init__: each field named in the class's CHOICES ({field: allowed values}, the one list
    that the check and --help both read) must hold one of them; rules are (field, ok, what is expected). The first
    broken one raises UsageError("--field: expected ..., got <value>"), which parse_config reports with the usage
    line."""
    choices = [(k, getattr(cfg, k) in allowed, "one of " + ", ".join(map(str, allowed)))
               for k, allowed in getattr(cfg, "CHOICES", {}).items()]
    for name, ok, expected in [*choices, *rules]:
        if not ok:
            raise UsageError(f"--{name}: expected {expected}, got {getattr(cfg, name)!r}")


# -----------------------------------------------------------------------------
# the command line, from dataclasses


def field_comments(cls: type) -> dict[str, str]:
    """The trailing '# comment' of each dataclass field, used as its --help text."""
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(argv: list[str] | None, types: list[type],
                 presets: Callable[[dict], tuple[str, dict, list[type]]] | None = None, description: str = "") -> list:
    """Build one instance of each dataclass in types from argv: --key value or --key=value for every field,
    converted by the field's type, unknown keys refused; a bool flag alone means true. presets: a function of the
    flags as first read ({field: value}) that returns (its name, {field: value}, more dataclass types): defaults
    applied between the dataclass defaults and the command line (train.py: the recipe of --dataset and --backbone),
    which --help shows as the values that will run, and configs that only this run has (the synthetic world's),
    built after those of types."""
    argv = sys.argv[1:] if argv is None else argv
    name, preset = "", {}
    if presets:  # a first read (without --help, which would exit), so that --help shows the preset's values
        first = _parser(types, description, {}, "", add_help=False).parse_known_args(argv)[0]
        name, preset, more = presets(vars(first))
        types = [*types, *more]
    owner = {f.name: cls for cls in types for f in dataclasses.fields(cls)}
    parser = _parser(types, description, preset, name, add_help=True)
    args, unknown = parser.parse_known_args(argv)
    try:  # the configs check their own values (__post_init__): a bad one is a usage error, like a bad type
        configs = [cls(**{k: v for k, v in vars(args).items() if owner[k] is cls}) for cls in types]
    except ValueError as e:  # said first: a mistyped --dataset also leaves its recipe's flags unknown
        parser.error(str(e))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return configs


def _parser(types: list[type], description: str, preset: dict, name: str, add_help: bool) -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False, add_help=add_help,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in types:
        comments, choices = field_comments(cls), getattr(cls, "CHOICES", {})
        for f in dataclasses.fields(cls):
            kind = {bool: parse_bool, int: int, float: float, str: str}.get(f.type, json.loads)
            extra = {"nargs": "?", "const": True} if f.type is bool else {}
            source = f"; the {name} preset's" if f.name in preset else ""
            allowed = f" {{{', '.join(map(str, choices[f.name]))}}}" if f.name in choices else ""
            parser.add_argument(f"--{f.name}", type=kind, default=preset.get(f.name, f.default),
                                metavar=f.name.upper(), help=(comments.get(f.name, "") + allowed).replace("%", "%%") +
                                f" (default: %(default)s{source})", **extra)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # under torchrun, rank 0 alone says it (every rank exits with status 2)
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

"""Command lines derived from frozen config dataclasses (no YAML chains).

Every field of a (nested) config dataclass becomes one flag, named by its path:
`--rounds 20`, `--fed.local_epochs=5`, `--data.partition dirichlet`. Help texts come from
the dataclasses' "Attributes:" docstring sections; defaults are the dataclass defaults.
`Optional` fields accept `none`; booleans accept true/false/1/0/yes/no.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from typing import Any


def _field_docs(cls: type) -> dict[str, str]:
  """Maps field names to their line in the class docstring's Attributes section."""
  doc = cls.__doc__ or ""
  docs, current = {}, None
  in_attributes = False
  for line in doc.splitlines():
    if line.strip() == "Attributes:":
      in_attributes = True
      continue
    if not in_attributes:
      continue
    match = re.match(r"^\s{2,}(\w+):\s*(.*)$", line)
    if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
      current = match.group(1)
      docs[current] = match.group(2)
    elif current and line.strip():
      docs[current] += " " + line.strip()
    elif not line.strip() and docs:
      current = None
  return docs


def _parser_for(tp: Any):
  """A string -> value converter for a field annotation, and a metavar."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType) and type(None) in args:
    inner = next(a for a in args if a is not type(None))
    convert, metavar = _parser_for(inner)
    return (lambda s: None if s.lower() == "none" else convert(s)), metavar + "|none"
  if tp is bool:
    def to_bool(s: str) -> bool:
      if s.lower() in ("1", "true", "yes", "on"):
        return True
      if s.lower() in ("0", "false", "no", "off"):
        return False
      raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return to_bool, "BOOL"
  if origin is tuple:
    elem = args[0] if args else str
    return (lambda s: tuple(elem(v) for v in s.split(",") if v)), "A,B,..."
  if tp in (int, float, str):
    return tp, tp.__name__.upper()
  raise TypeError(f"config field type {tp} has no command-line form")


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
  """Adds one flag per (nested) field of dataclass `cls` to `parser`."""
  hints = typing.get_type_hints(cls)
  docs = _field_docs(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      add_arguments(parser, tp, prefix + f.name + ".")
      continue
    convert, metavar = _parser_for(tp)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    parser.add_argument(f"--{prefix}{f.name}", dest=prefix + f.name, type=convert,
                        metavar=metavar, default=argparse.SUPPRESS,
                        help=f"{docs.get(f.name, '')} (default: {default})".strip())


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
  """Instantiates `cls` from the flat `{'fed.local_epochs': 5, ...}` overrides."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      kwargs[f.name] = build(tp, values, prefix + f.name + ".")
    elif prefix + f.name in values:
      kwargs[f.name] = values[prefix + f.name]
  return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
  """A JSON-ready dict of a config dataclass (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
  """Inverse of `to_dict` for configs written by this version."""
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in data:
      continue
    tp, value = hints[f.name], data[f.name]
    if dataclasses.is_dataclass(tp):
      value = from_dict(tp, value)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[f.name] = value
  return cls(**kwargs)


def parse(cls: type, argv: list[str] | None = None, *, description: str = "",
          extra: typing.Callable[[argparse.ArgumentParser], None] | None = None
          ) -> tuple[Any, argparse.Namespace]:
  """Parses `argv` into a `cls` instance; `extra` may add non-config flags.

  Returns the config and the namespace (for the extra flags). A config that its own
  `__post_init__` rejects ends the program with that message, not a traceback.
  """
  parser = argparse.ArgumentParser(description=description)
  if extra is not None:
    extra(parser)
  add_arguments(parser, cls)
  ns = parser.parse_args(argv)
  values = {k: v for k, v in vars(ns).items() if "." in k or k in
            {f.name for f in dataclasses.fields(cls)}}
  try:
    return build(cls, values), ns
  except (ValueError, TypeError) as e:
    parser.error(str(e))

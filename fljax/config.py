"""Command lines derived from frozen config dataclasses (no YAML chains).

Every field of a (nested) config dataclass becomes one flag, named by its path:
`--rounds 20`, `--fed.local_epochs=5`, `--data.partition dirichlet`. Help texts come from
the dataclasses' "Attributes:" docstring sections; defaults are the dataclass defaults.

  --rounds 20, --rounds=20      a value
  --tiny, --tiny false          booleans: bare means true; true/false/1/0/yes/no/on/off
  --seeds 0,1,2                 tuples: one comma-separated value
  --privacy.z_end none          `Optional` fields accept none
Fields typed `typing.Literal[...]`, or declared with `dataclasses.field(metadata={"choices":
(...)})` for names that live in a registry, accept only those names and list them in --help.
Bad input ends the program with one line on stderr, `error: ...`, and exit status 2: a value
the flag's type or the dataclass's `__post_init__` rejects, or an unknown flag (with the
closest valid one). Abbreviated flags are not accepted.

Why our own parser rather than tyro, simple_parsing or absl flags: every config is already a
frozen dataclass that a run saves as config.json and reloads with `from_dict`; deriving the
flags from the same dataclasses (types, defaults, docstrings) in one small module keeps the
command line, config.json and the code on the same names and values, with no dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from typing import Any, Callable

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_ENTRY = re.compile(r"^(\s*)(\w+(?:\s*,\s*\w+)*)\s*:(?:\s+(.*))?$")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _attributes(doc: str) -> dict[str, str]:
  """Maps names to their text in the docstring's "Attributes:" section.

  An entry is `name: text` (or `a, b: text`, shared) at the indentation of the section's
  first line; more deeply indented lines continue it; a line indented less, or at the
  attributes' own level, ends the section.
  """
  lines = doc.splitlines()
  start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
  if start is None:
    return {}
  outer, level, docs, names = _indent(lines[start]), None, {}, []
  for line in lines[start + 1:]:
    if not line.strip():
      continue
    indent = _indent(line)
    if level is None:
      level = indent
    if indent <= outer or indent < level:
      break
    match = _ENTRY.match(line)
    if indent == level and match:
      names = [n.strip() for n in match.group(2).split(",")]
      for name in names:
        docs[name] = (match.group(3) or "").strip()
    elif indent > level and names:
      for name in names:
        docs[name] = f"{docs[name]} {line.strip()}".strip()
    else:
      break
  return docs


def field_docs(cls: type) -> dict[str, str]:
  """Maps the fields of dataclass `cls` to their help: its own docstring's Attributes
  section first, then its base classes'."""
  names = {f.name for f in dataclasses.fields(cls)}
  docs: dict[str, str] = {}
  for klass in cls.__mro__:
    for name, text in _attributes(klass.__doc__ or "").items():
      if name in names:
        docs.setdefault(name, text)
  return docs


def _choices(tp: Any, f: dataclasses.Field) -> tuple | None:
  """The names a field (or each element of a tuple field) accepts: its metadata's
  "choices", or the values of the `Literal[...]` in its annotation."""
  if "choices" in f.metadata:
    return tuple(f.metadata["choices"])
  while typing.get_origin(tp) is not typing.Literal:
    inner = [a for a in typing.get_args(tp) if a not in (type(None), Ellipsis)]
    if len(inner) != 1:
      return None
    tp = inner[0]
  return typing.get_args(tp)


def _show(value: Any) -> str:
  """A value as it is written on the command line."""
  if value is None:
    return "none"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, tuple):
    return ",".join(map(_show, value))
  return str(value)


def _parser_for(tp: Any, choices: tuple | None = None) -> tuple[Callable[[str], Any], str]:
  """A string -> value converter for a field annotation (raising ValueError with a
  one-line reason), and a metavar."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType) and type(None) in args:
    inner = next(a for a in args if a is not type(None))
    convert, metavar = _parser_for(inner, choices)
    return (lambda s: None if s.lower() == "none" else convert(s)), metavar + "|none"
  if origin is tuple:
    elem = args[0] if args else str
    convert, metavar = _parser_for(elem, choices)
    return (lambda s: tuple(convert(v.strip()) for v in s.split(",") if v.strip())), \
        f"{metavar},..."
  if choices is None and origin is typing.Literal:
    choices = args
  if choices is not None:
    def choice(s: str) -> Any:
      for c in choices:
        if _show(c) == s:
          return c
      raise ValueError(f"{s!r} is not one of {', '.join(map(_show, choices))}")
    return choice, "NAME"
  if tp is bool:
    def to_bool(s: str) -> bool:
      if s.lower() in _TRUE:
        return True
      if s.lower() in _FALSE:
        return False
      raise ValueError(f"{s!r} is not a boolean (true or false)")
    return to_bool, "BOOL"
  if tp in (int, float, str):
    def scalar(s: str) -> Any:
      try:
        return tp(s)
      except ValueError:
        raise ValueError(f"{s!r} is not {'an int' if tp is int else 'a number'}") from None
    return scalar, tp.__name__.upper()
  raise TypeError(f"config field type {tp} has no command-line form")


def parse_value(tp: Any, text: str) -> Any:
  """`text` read as a value of annotation `tp`, as its flag would read it; ValueError
  (one line, naming the bad element) when it is not one."""
  return _parser_for(tp)[0](text)


def _for_argparse(convert: Callable[[str], Any]) -> Callable[[str], Any]:
  def read(s: str) -> Any:
    try:
      return convert(s)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return read


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                  group: Any = None) -> None:
  """Adds one flag per (nested) field of dataclass `cls` to `parser`; each nested
  dataclass gets its own help section."""
  hints = typing.get_type_hints(cls)
  docs = field_docs(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if dataclasses.is_dataclass(tp):
      title = docs.get(f.name) or ((tp.__doc__ or "").strip().splitlines() or [""])[0]
      title = "" if title.startswith(tp.__name__ + "(") else title  # dataclass's own __doc__
      section = parser.add_argument_group(f"--{prefix}{f.name}.*", title)
      add_arguments(parser, tp, prefix + f.name + ".", section)
      continue
    choices = _choices(tp, f)
    convert, metavar = _parser_for(tp, choices)
    kwargs: dict[str, Any] = {}
    if bool in (tp, *typing.get_args(tp)):
      kwargs = {"nargs": "?", "const": True}
    if f.default is not dataclasses.MISSING:
      default = f" (default: {_show(f.default)})"
    elif f.default_factory is not dataclasses.MISSING:
      default = f" (default: {_show(f.default_factory())})"
    else:
      default, kwargs["required"] = "", True
    listed = f" [{', '.join(map(_show, choices))}]" if choices else ""
    text = (docs.get(f.name, "") + listed + default).strip()
    (group or parser).add_argument(
        f"--{prefix}{f.name}", dest=prefix + f.name, type=_for_argparse(convert),
        metavar=metavar, default=argparse.SUPPRESS, help=text.replace("%", "%%"), **kwargs)


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


class _Parser(argparse.ArgumentParser):
  """argparse, with every error one line on stderr and exit status 2."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"error: {re.sub(r'^argument ', '', message)}\n")


def _unknown(parser: argparse.ArgumentParser, extras: list[str]) -> str:
  """One sentence about the first argument no flag took, naming the closest valid flag."""
  flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
  first = next((a for a in extras if a.startswith("-")), None)
  if first is None:
    return (f"unexpected argument {extras[0]!r}: a flag takes one value (lists are "
            f"comma-separated); --help lists the flags")
  flag = first.split("=")[0]
  negated = "--" + flag[len("--no-"):].replace("-", "_")
  if flag.startswith("--no-") and negated in flags:
    return f"unknown flag {flag}; did you mean {negated} false?"
  close = difflib.get_close_matches(flag, flags, n=1)
  hint = f"did you mean {close[0]}?" if close else "--help lists the flags"
  return f"unknown flag {flag}; {hint}"


def parse(cls: type, argv: list[str] | None = None, *, description: str = "",
          extra: Callable[[argparse.ArgumentParser], None] | None = None
          ) -> tuple[Any, argparse.Namespace]:
  """Parses `argv` (default: `sys.argv[1:]`) into a `cls` instance; `extra` may add
  non-config flags (and positional arguments) to the parser.

  Returns the config and the namespace (for the extra flags). Bad input, including a
  config that its own `__post_init__` rejects, ends the program with one line on stderr
  and exit status 2, not a traceback.
  """
  parser = _Parser(description=description, allow_abbrev=False)
  if extra is not None:
    extra(parser)
  add_arguments(parser, cls)
  ns, extras = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  if extras:
    parser.error(_unknown(parser, extras))
  values = {k: v for k, v in vars(ns).items() if "." in k or k in
            {f.name for f in dataclasses.fields(cls)}}
  try:
    return build(cls, values), ns
  except (ValueError, TypeError) as e:
    parser.error(str(e))

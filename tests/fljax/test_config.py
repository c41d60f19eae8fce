"""Tests of fljax/config.py: flags derived from nested frozen dataclasses."""

import dataclasses
from typing import Literal

import pytest

from fljax import config as config_lib

MODES = ("fast", "slow", "exact")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
  """Inner, 100% nested.

  Attributes:
    size: an optional size.
    widths: layer widths.
    flag: a switch, on 50% of the time.
  """

  size: int | None = None
  widths: tuple[int, ...] = (4, 8)
  flag: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
  """Outer.

  Attributes:
    inner: the inner settings.
    lr: the learning rate.
    name: a name.
    mode: how it runs: fast (the default), slow
      (careful) or exact.
    kind: a kind from a Literal.
    kinds: several kinds.
    verbose: print more.
  """

  inner: Inner = Inner()
  lr: float = 0.1
  name: str = "a"
  mode: str = dataclasses.field(default="fast", metadata={"choices": MODES})
  kind: Literal["x", "y"] | None = None
  kinds: tuple[Literal["x", "y"], ...] = ("x",)
  verbose: bool = True

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError("lr must be > 0")


def parse_error(argv, capsys, cls=Outer) -> str:
  """The one stderr line of a rejected command line (exit status 2)."""
  with pytest.raises(SystemExit) as e:
    config_lib.parse(cls, argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
  return err.strip()


def help_text(capsys, argv=("--help",)) -> str:
  """The --help output, its whitespace collapsed."""
  with pytest.raises(SystemExit) as e:
    config_lib.parse(Outer, list(argv))
  assert e.value.code == 0
  return " ".join(capsys.readouterr().out.split())


def test_defaults_and_overrides():
  cfg, _ = config_lib.parse(Outer, [])
  assert cfg == Outer()
  cfg, _ = config_lib.parse(Outer, ["--lr", "0.5", "--inner.size=3", "--inner.widths", "1,2,3",
                                    "--inner.flag", "yes", "--name", "b", "--mode", "exact",
                                    "--kind", "y", "--kinds", "y,x"])
  assert cfg == Outer(inner=Inner(size=3, widths=(1, 2, 3), flag=True), lr=0.5, name="b",
                      mode="exact", kind="y", kinds=("y", "x"))
  cfg, _ = config_lib.parse(Outer, ["--inner.size", "none", "--kind", "none"])
  assert cfg.inner.size is None and cfg.kind is None


def test_bare_boolean_means_true_and_takes_a_value():
  assert config_lib.parse(Outer, ["--inner.flag"])[0].inner.flag is True
  assert config_lib.parse(Outer, ["--inner.flag", "--lr", "0.5"])[0] == Outer(
      inner=Inner(flag=True), lr=0.5)
  assert config_lib.parse(Outer, ["--verbose", "false"])[0].verbose is False
  assert config_lib.parse(Outer, ["--verbose=0"])[0].verbose is False


def test_nested_section_takes_the_class_summary_without_a_field_doc(capsys):
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Bare:
    inner: Inner = Inner()

  with pytest.raises(SystemExit):
    config_lib.parse(Bare, ["--help"])
  assert "--inner.*: Inner, 100% nested." in " ".join(capsys.readouterr().out.split())


def test_round_trip_through_dict():
  cfg = Outer(inner=Inner(size=2, widths=(3,)), lr=0.2, kinds=("x", "y"))
  assert config_lib.from_dict(Outer, config_lib.to_dict(cfg)) == cfg


def test_field_docs_are_indentation_based():
  @dataclasses.dataclass(frozen=True)
  class Doc:
    """Doc.

    Attributes:
      a: first: with a colon,
        continued here.
        b: still a's text (deeper than the entries).
      b, c: shared by b and c.
      d:
        only on the next line.

    Not an attribute: this paragraph.
    """

    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0

  @dataclasses.dataclass(frozen=True)
  class Child(Doc):
    """Child, documenting one more field.

    Attributes:
      e: the child's own field.
    """

    e: int = 0

  assert config_lib.field_docs(Doc) == {
      "a": "first: with a colon, continued here. b: still a's text (deeper than the entries).",
      "b": "shared by b and c.", "c": "shared by b and c.", "d": "only on the next line."}
  assert config_lib.field_docs(Child) == {**config_lib.field_docs(Doc),
                                          "e": "the child's own field."}


def test_help_lists_docs_defaults_and_choices(capsys):
  text = help_text(capsys)
  assert "--inner.widths INT,... layer widths. (default: 4,8)" in text
  assert "--lr FLOAT the learning rate. (default: 0.1)" in text
  assert ("--mode NAME how it runs: fast (the default), slow (careful) or exact. "
          "[fast, slow, exact] (default: fast)") in text
  assert "[x, y] (default: none)" in text and "[x, y] (default: x)" in text
  assert "--inner.*: the inner settings." in text
  assert "on 50% of the time. (default: false)" in text  # argparse's % escaped


def test_choices_refuse_other_names(capsys):
  assert parse_error(["--mode", "quick"], capsys) == (
      "error: --mode: 'quick' is not one of fast, slow, exact")
  assert parse_error(["--kinds", "x,z"], capsys) == "error: --kinds: 'z' is not one of x, y"


def test_bad_values_name_the_flag_and_the_element(capsys):
  assert parse_error(["--inner.widths", "0,x"], capsys) == (
      "error: --inner.widths: 'x' is not an int")
  assert parse_error(["--lr", "abc"], capsys) == "error: --lr: 'abc' is not a number"
  assert parse_error(["--inner.flag", "maybe"], capsys) == (
      "error: --inner.flag: 'maybe' is not a boolean (true or false)")
  assert parse_error(["--lr", "-1"], capsys) == "error: lr must be > 0"


def test_unknown_flags_name_the_closest_valid_one(capsys):
  assert parse_error(["--inner.widht", "3"], capsys) == (
      "error: unknown flag --inner.widht; did you mean --inner.widths?")
  assert parse_error(["--no-verbose"], capsys) == (
      "error: unknown flag --no-verbose; did you mean --verbose false?")
  assert parse_error(["--lrate=0.2"], capsys).startswith("error: unknown flag --lrate;")
  assert parse_error(["--l", "0.2"], capsys).startswith("error: unknown flag --l;")  # no prefixes
  assert "unexpected argument 'stray'" in parse_error(["stray"], capsys)


def test_help_is_never_taken_as_a_value(capsys):
  assert parse_error(["--name", "--help"], capsys) == "error: --name: expected one argument"
  assert "--inner.flag" in help_text(capsys, ["--inner.flag", "--help"])


def test_parse_value_reads_like_its_flag():
  assert config_lib.parse_value(tuple[int, ...], "1, 2") == (1, 2)
  assert config_lib.parse_value(float | None, "none") is None
  with pytest.raises(ValueError, match="'x' is not an int"):
    config_lib.parse_value(tuple[int, ...], "1,x")


def test_required_fields_are_required_flags(capsys):
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Needs:
    """Needs.

    Attributes:
      path: where.
    """

    path: str

  assert config_lib.parse(Needs, ["--path", "p"])[0] == Needs(path="p")
  assert "--path" in parse_error([], capsys, Needs)

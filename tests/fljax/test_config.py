"""Tests of fljax/config.py: flags derived from nested frozen dataclasses."""

import dataclasses

import pytest

from fljax import config as config_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner:
  """Inner.

  Attributes:
    size: an optional size.
    widths: layer widths.
  """

  size: int | None = None
  widths: tuple[int, ...] = (4, 8)
  flag: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer:
  """Outer.

  Attributes:
    lr: the learning rate.
  """

  inner: Inner = Inner()
  lr: float = 0.1
  name: str = "a"

  def __post_init__(self):
    if self.lr <= 0:
      raise ValueError("lr must be > 0")


def test_defaults_and_overrides():
  cfg, _ = config_lib.parse(Outer, [])
  assert cfg == Outer()
  cfg, _ = config_lib.parse(Outer, ["--lr", "0.5", "--inner.size=3", "--inner.widths", "1,2,3",
                                    "--inner.flag", "yes", "--name", "b"])
  assert cfg == Outer(inner=Inner(size=3, widths=(1, 2, 3), flag=True), lr=0.5, name="b")
  cfg, _ = config_lib.parse(Outer, ["--inner.size", "none"])
  assert cfg.inner.size is None


def test_round_trip_through_dict():
  cfg = Outer(inner=Inner(size=2, widths=(3,)), lr=0.2)
  assert config_lib.from_dict(Outer, config_lib.to_dict(cfg)) == cfg


def test_help_lists_docs(capsys):
  with pytest.raises(SystemExit) as e:
    config_lib.parse(Outer, ["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  assert "--inner.widths" in text and "layer widths" in text and "the learning rate" in text


def test_invalid_values_exit_with_message(capsys):
  with pytest.raises(SystemExit) as e:
    config_lib.parse(Outer, ["--lr", "-1"])
  assert e.value.code == 2 and "lr must be > 0" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    config_lib.parse(Outer, ["--lr", "abc"])
  with pytest.raises(SystemExit):
    config_lib.parse(Outer, ["--no-such-flag", "1"])

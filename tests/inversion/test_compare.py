"""Tests of inversion/compare.py (behind scripts/compare_attacks.py): variants are read or
refused with the valid names, and a tiny comparison writes one table and one grid."""

import json

import pytest

from inversion import compare


def test_variants_are_read_or_refused_with_the_valid_names():
  assert compare.parse_variant("dps[features=0,scale=8]") == ("dps", {"features": 0.0,
                                                                      "scale": 8.0})
  assert compare.split_variants("ig, dps[features=0,scale=8],idlg") == [
      "ig", "dps[features=0,scale=8]", "idlg"]
  with pytest.raises(ValueError, match="valid: .*gifd"):
    compare.parse_variant("gan_attack")
  with pytest.raises(ValueError, match="not an attack setting"):
    compare.parse_variant("dps[zeta=3]")


def test_tiny_comparison_writes_one_table_and_one_grid(tmp_path, capsys):
  compare.main(["--workdir", str(tmp_path / "cmp"), "--data.name", "digits",
                "--data.image_size", "none", "--data.channels", "none", "--victims.num", "1",
                "--attack.optimizer", "adam", "--attack.steps", "3", "--feature_metric",
                "false", "--attacks", "idlg,ig[steps=2]"])
  rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
  assert [r["attack"] for r in rows] == ["idlg", "ig[steps=2]"]
  assert [r["steps"] for r in rows] == [3, 2]
  assert (tmp_path / "cmp" / "comparison.md").read_text().count("\n") == 2 + 2
  assert (tmp_path / "cmp" / "comparison.png").exists()
  assert "| cmp | ig_steps=2 |" in compare.collect(tmp_path)  # one row per finished folder
  with pytest.raises(SystemExit, match="unknown attack 'magic'"):
    compare.main(["--workdir", str(tmp_path / "bad"), "--attacks", "ig,magic"])
  with pytest.raises(SystemExit, match="no attack variant"):
    compare.main(["--workdir", str(tmp_path / "bad"), "--attacks", ","])

"""Tests of inversion/specs.py's plan builders: a budget too small for one step of an attack
(or too large for its prior) is one sentence naming the attack, its bound and the flag,
raised by the driver before anything is trained or attacked."""

import pytest

from fljax import classifier, models
from inversion import experiment, observation as ob, specs

SHAPE = (32, 32, 3)


def _plan(**attack):
  model = models.make("cnn", num_classes=10, input_shape=SHAPE)
  threat = ob.ThreatModel(batch_size=1, input_shape=SHAPE, num_classes=10)
  spec = specs.AttackSpec(**attack)
  return specs.ATTACKS[spec.name](model, threat, spec, specs.DefenseSpec())


@pytest.mark.parametrize("attack, message", [
    (dict(name="ig", budget=2, restarts=3),
     "attack ig needs --attack.budget >= 3 (1 per restart for one step, 3 restarts), got 2; "
     "raise --attack.budget or lower --attack.restarts"),
    (dict(name="dps", budget=5, refine_steps=5),
     "attack dps needs --attack.budget >= 6 (6 per restart for one sampler step and 5 "
     "refinement steps, 1 restart), got 5; raise --attack.budget or lower "
     "--attack.refine_steps"),
    (dict(name="ggdm", budget=3, refine_steps=1, restarts=2),
     "attack ggdm needs --attack.budget >= 4 (2 per restart for one sampler step and 1 "
     "refinement step, 2 restarts), got 3; raise --attack.budget or lower "
     "--attack.refine_steps or --attack.restarts"),
    (dict(name="gifd", budget=3),
     "attack gifd needs --attack.budget >= 4 (4 per restart for one latent step and one step "
     "in each of its 3 feature stages, 1 restart), got 3; raise --attack.budget"),
    (dict(name="gifd", budget=7, restarts=2), "needs --attack.budget >= 8 "),
    (dict(name="gifd", steps=3), "attack gifd needs --attack.steps >= 4 "),
    (dict(name="dps_nojac", budget=1001),
     "attack dps_nojac takes at most 1000 sampler steps (its prior's schedule), got 1001 from "
     "--attack.budget 1001; lower --attack.budget to 1000 or spend the rest on "
     "--attack.refine_steps"),
    (dict(name="dps", steps=1200, budget=10), "got 1200; lower --attack.steps"),
])
def test_a_budget_an_attack_cannot_use_is_one_sentence(attack, message):
  with pytest.raises(ValueError) as e:
    _plan(**attack)
  assert str(e.value).startswith(message) or message in str(e.value)
  assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)


def test_the_smallest_budgets_are_accepted_and_spent_as_planned():
  plan = _plan(name="gifd", budget=4)
  assert plan.budget == 4 and plan.steps == 4 + 3 + 1  # 4 optimisation steps, 4 scorings
  plan = _plan(name="dps", budget=12, refine_steps=5, restarts=2)
  assert (plan.steps, plan.budget) == (6, 6)
  plan = _plan(name="dps", budget=1005, refine_steps=5)
  assert (plan.steps, plan.budget) == (1005, 1005)


def test_the_driver_refuses_a_bad_budget_before_training_anything(tmp_path, monkeypatch):
  def train(*args, **kwargs):
    raise AssertionError("the model was trained before the budget was checked")
  monkeypatch.setattr(classifier, "train", train)
  with pytest.raises(SystemExit, match="^error: attack gifd needs --attack.budget >= 4 "):
    experiment.main(["--workdir", str(tmp_path / "run"), "--data.name", "digits",
                     "--attack.name", "gifd", "--attack.budget", "3", "--progress", "false"])


@pytest.mark.parametrize("share, lengths", [(None, (46, 3 * 18)), (0.3, (70, 3 * 10)),
                                            (0.9, (10, 3 * 30))])
def test_gifds_stage_lengths_follow_feature_share(monkeypatch, share, lengths):
  from inversion.attacks import gifd
  seen = []
  monkeypatch.setattr(gifd, "make", lambda *args: seen.append(args[-1]) or None)
  _plan(name="gifd", budget=100, feature_share=share)
  cfg, = seen
  assert (cfg.latent_steps, cfg.stages * cfg.feature_steps) == lengths


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2])
def test_a_feature_share_outside_zero_one_is_one_sentence(share):
  with pytest.raises(ValueError, match="attack.feature_share must lie strictly between 0 and 1"):
    specs.AttackSpec(name="gifd", feature_share=share)

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import prior as prior_lib
from diffusion import schedules, training, unet
from fljax import datasets, runs

# One resolution level (ResNet blocks, the middle block, class embedding): small to compile.
TINY = dict(data=training.DataConfig(name="digits", image_size=8, channels=1, train_subset=200),
            block_out_channels=(16,), down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",), norm_num_groups=4, attention_head_dim=8,
            batch_size=16, warmup=5, log_every=5, checkpoint_every=5, sample_every=0, sample_steps=2)


def test_a_few_steps_on_8x8_digits_lower_the_loss():
  config = training.TrainConfig(**TINY, steps=40)
  ds = datasets.load("digits", image_size=8, channels=1, train_subset=200)
  ucfg = config.unet_config(ds.image_shape, ds.num_classes)
  model, schedule = unet.UNet(ucfg), schedules.linear(1000)
  loss_fn = training.make_loss_fn(model, schedule, label_dropout=0.1)
  optimizer = training.make_optimizer(config)
  params = unet.init(ucfg, key=jax.random.key(0))
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                              opt_state=optimizer.init(params), key=jax.random.key(1))
  step = jax.jit(training.make_train_step(loss_fn, optimizer, jnp.asarray(ds.x_train),
                                          jnp.asarray(ds.y_train), batch_size=16, ema_decay=0.9))
  # The loss on a fixed held-out batch and fixed noise, before and after.
  batch = (jnp.asarray(ds.x_test[:64]), jnp.asarray(ds.y_test[:64]))
  evaluate = jax.jit(lambda p: loss_fn(p, batch, jax.random.key(2))[0])
  before = float(evaluate(state.params))
  for _ in range(40):
    state, _ = step(state)
  assert float(evaluate(state.params)) < 0.6 * before
  assert float(evaluate(state.ema_params)) < before


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_other_parameterisations_train(prediction):
  ds = datasets.load("digits", image_size=8, channels=1, train_subset=50)
  config = training.TrainConfig(**TINY, prediction=prediction, conditional=False)
  ucfg = config.unet_config(ds.image_shape, ds.num_classes)
  loss_fn = training.make_loss_fn(unet.UNet(ucfg), schedules.cosine(100), prediction=prediction)
  loss, _ = loss_fn(unet.init(ucfg, key=jax.random.key(0)), (ds.x_train[:4], None), jax.random.key(1))
  assert np.isfinite(float(loss))


def _params(workdir):
  return prior_lib.load(workdir / "prior").params


@pytest.mark.slow  # four training runs (about 40 s); fljax's checkpoint and runs tests cover resume and damaged checkpoints
def test_resume_is_bit_identical_and_a_corrupted_checkpoint_falls_back(tmp_path, capsys):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  training.train(training.TrainConfig(**TINY, steps=10), straight, progress=False)
  training.train(training.TrainConfig(**TINY, steps=5), resumed, progress=False)
  training.train(training.TrainConfig(**TINY, steps=10), resumed, progress=False)
  # (Each run above compiles afresh, as separate processes would.)
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
  records = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [5, 10]

  # Damage the newest checkpoint (step 10): the next run sets it aside, resumes from step 5
  # and reproduces the same weights.
  newest = resumed / "checkpoints" / "10"
  for f in newest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0garbage")
  shutil.rmtree(resumed / "prior")
  capsys.readouterr()
  training.train(training.TrainConfig(**TINY, steps=10), resumed, progress=False)
  captured = capsys.readouterr()
  assert [line for line in captured.err.splitlines() if "10.corrupt" in line]
  assert "resuming at step 5" in captured.out
  assert (resumed / "checkpoints" / "10.corrupt").exists()
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))


def test_outputs_of_a_run(tmp_path):
  training.train(training.TrainConfig(**{**TINY, "log_every": 2}, steps=4), tmp_path, progress=False)
  assert (tmp_path / "samples_000004.png").exists()
  prior = prior_lib.load(tmp_path / "prior")
  assert prior.num_classes == 10 and prior.unet_config.num_class_embeds == 11
  grid = training.sample_grid(prior, key=jax.random.key(0), per_class=2, num_steps=2)
  assert grid.shape == (10, 2, 8, 8, 1) and grid.min() >= 0 and grid.max() <= 1
  with pytest.raises(runs.WorkdirError, match="different config"):
    training.train(training.TrainConfig(**{**TINY, "lr": 0.5}, steps=4), tmp_path, progress=False)


def test_bad_configs_say_what_to_change():
  with pytest.raises(ValueError, match="prediction"):
    training.TrainConfig(prediction="score")
  with pytest.raises(ValueError, match="label_dropout"):
    training.TrainConfig(label_dropout=1.0)
  with pytest.raises(unet.ConfigError, match="norm_num_groups"):
    training.TrainConfig(norm_num_groups=5).unet_config((32, 32, 1), 10)


def test_a_prior_with_wrong_weights_names_the_tensor(tmp_path):
  training.train(training.TrainConfig(**TINY, steps=1), tmp_path, progress=False)
  unet_json = tmp_path / "prior" / "unet.json"
  config = json.loads(unet_json.read_text())
  config["block_out_channels"] = [24]
  unet_json.write_text(json.dumps(config))
  with pytest.raises(prior_lib.PriorError, match="shape"):
    prior_lib.load(tmp_path / "prior")
  with pytest.raises(prior_lib.PriorError, match="unet.json is missing"):
    prior_lib.load(tmp_path)

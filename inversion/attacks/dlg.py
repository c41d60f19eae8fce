"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and iDLG (Zhao et al. 2020).

Dummy inputs (and, without known labels, dummy label logits) are optimised so that the
update they produce on the observed parameters (`inversion.observation.forward`: the
FedSGD gradient, or FedAvg's unrolled local steps) matches the observed one (L2 by
default). iDLG first reads a single example's label from the last layer's gradient
(`inversion.labels.idlg`; for FedAvg the delta is read as a negative gradient, which holds
for one local step) and optimises the input only; batches take their labels from the
batch estimators of `inversion.labels` the same way.

Every evaluation of the matching loss (its value and its gradient with respect to the
dummy variables: one double-backward evaluation) is made once and charged once: `init`
makes the first, and the state keeps the loss and gradient at its iterate for the next
step. The optimisers (`OPTIMIZERS`):

  lbfgs       the original DLG's: torch.optim.LBFGS with torch's defaults (no line search,
              a fixed step lr = 1, history 100; `inversion.lbfgs`). One step is one
              iteration and costs one evaluation; torch's convergence tests end the run.
  lbfgs_zoom  optax.lbfgs with its zoom (strong-Wolfe) line search; a step costs the line
              search's trials (1 to 20 evaluations), whose last value and gradient the next
              step reuses (as `optax.value_and_grad_from_state` would).
  adam        Adam at `lr`; one evaluation per step.

The default is 'lbfgs', by measurement (`scripts/convergence.py`, docs/inversion.md: iDLG
on DLG's LeNet, FedSGD B = 1, 48 photo victims, 3000 evaluations each): it brings 85 % of
the victims to 30 dB in a median 533 evaluations, 'lbfgs_zoom' as many in a median 1103
(twice the evaluations), Adam at lr 0.1 none of 24 (median best 12.5 dB).

A step whose loss is not finite, or whose iterate is not finite or explodes
(`attacks.healthy`), keeps the previous iterate and sets `diverged`; a diverged state is
not stepped again (a deterministic step would repeat the failure). The driver reports such
a victim as failed (or restarts it), never scores it silently.

`restart` (lbfgs only): torch's L-BFGS ends a run where it can never move again (a
vanishing gradient, a flat slope: `inversion.lbfgs`), and the original DLG then idles out
its budget. With `restart`, the step after such an end (or after a non-finite or exploding
iterate) draws a fresh uniform image (and fresh label logits when labels are learned) from
the state's own key and starts L-BFGS again there: one evaluation, charged like any other.
The state then reports the lowest matching loss over all starts (`x`, `label_logits`,
`loss`), while the current start lives in the L-BFGS state; it never sets `diverged`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from inversion import labels as label_inference
from inversion import lbfgs, objectives
from inversion.attacks import Attack, counted, guard, healthy, no_counts
from inversion.observation import Observation, ThreatModel, forward


LABELS = ("optimise", "known") + label_inference.METHODS
OPTIMIZERS = ("lbfgs", "lbfgs_zoom", "adam")
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLGConfig:
  """DLG settings.

  Attributes:
    optimizer: 'lbfgs' (torch's, DLG's), 'lbfgs_zoom' (optax's, zoom line search) or
      'adam' (module docstring).
    lr: lbfgs's fixed step or Adam's learning rate (none: 1 for lbfgs, 0.1 for Adam);
      lbfgs_zoom takes its step from the line search and refuses one.
    objective: 'l2', 'cosine' or 'layer_cosine'.
    labels: 'optimise' (DLG: soft labels learned jointly), 'known' (from the
      observation), or inferred from the update first: 'idlg' (batch size 1),
      'bias_corrected' or 'yin' (batches; `inversion.labels`).
    restart: lbfgs: start again from a fresh random image whenever L-BFGS ends its run
      with budget left, reporting the lowest loss over the starts (module docstring).
    restart_after: with restart, also start again once the current start has spent this
      many evaluations (a start that wanders without ending; none: only when it ends).
  """

  optimizer: str = "lbfgs"
  lr: float | None = None
  objective: str = "l2"
  labels: str = "idlg"
  restart: bool = False
  restart_after: int | None = None

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.lr is not None and self.optimizer == "lbfgs_zoom":
      raise ValueError("lbfgs_zoom takes its step from its line search; leave lr unset or "
                       "choose optimizer 'lbfgs' or 'adam'")
    if self.lr is not None and self.lr <= 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")
    if self.objective not in objectives.OBJECTIVES:
      raise ValueError(f"objective must be one of {sorted(objectives.OBJECTIVES)}")
    if self.labels not in LABELS:
      raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
    if self.restart and self.optimizer != "lbfgs":
      raise ValueError(f"restart applies to optimizer lbfgs (whose runs end), not "
                       f"{self.optimizer!r}; drop restart or choose lbfgs")
    if self.restart_after is not None and (not self.restart or self.restart_after < 2):
      raise ValueError(f"restart_after needs restart and at least 2 evaluations (a start "
                       f"and a step), got {self.restart_after} with restart={self.restart}")


class DLGState(NamedTuple):
  x: jax.Array             # [B, H, W, C] current reconstruction (restart: the best start's)
  label_logits: jax.Array  # [B, K] (fixed one-hot logits when labels are not optimised)
  opt_state: Any           # the optimiser's state (lbfgs: `inversion.lbfgs.LBFGSState`)
  loss: jax.Array          # the matching loss at (x, label_logits)
  grad: Any                # its gradient with respect to the optimised variables
  diverged: jax.Array
  counts: jax.Array
  key: jax.Array           # restart: the key of the next fresh start (else spent, unused)


class _Optimizer(NamedTuple):
  """`init(variables, loss, grad) -> opt_state`; `step(opt_state, variables, loss, grad,
  value_and_grad) -> (variables, loss, grad, opt_state, evaluations made)`."""

  init: Callable[..., Any]
  step: Callable[..., tuple[Any, jax.Array, Any, Any, jax.Array]]


def _adam(lr: float) -> _Optimizer:
  opt = optax.adam(lr)

  def step(opt_state, variables, loss, grad, value_and_grad):
    updates, opt_state = opt.update(grad, opt_state, variables)
    variables = optax.apply_updates(variables, updates)
    loss, grad = value_and_grad(variables)
    return variables, loss, grad, opt_state, jnp.ones((), jnp.int32)

  return _Optimizer(lambda v, loss, g: opt.init(v), step)


def _lbfgs(lr: float) -> _Optimizer:
  cfg = lbfgs.LBFGSConfig(lr=lr)

  def step(opt_state, variables, loss, grad, value_and_grad):
    new = lbfgs.update(opt_state, value_and_grad, cfg)
    return new.params, new.value, new.grad, new, new.evaluations - opt_state.evaluations

  return _Optimizer(lambda v, loss, g: lbfgs.init(v, loss, g, cfg), step)


def _lbfgs_zoom() -> _Optimizer:
  opt = optax.lbfgs()

  def step(opt_state, variables, loss, grad, value_and_grad):
    fn = lambda v: value_and_grad(v)[0]  # noqa: E731  (differentiated by the line search)
    updates, opt_state = opt.update(grad, opt_state, variables, value=loss, grad=grad,
                                    value_fn=fn)
    variables = optax.apply_updates(variables, updates)
    trials = optax.tree.get(opt_state, "num_linesearch_steps")
    return (variables, optax.tree.get(opt_state, "value"), optax.tree.get(opt_state, "grad"),
            opt_state, trials)

  return _Optimizer(lambda v, loss, g: opt.init(v), step)


def make(apply_fn: Callable[[Any, jax.Array], jax.Array], threat: ThreatModel,
         cfg: DLGConfig = DLGConfig()) -> Attack:
  """The DLG / iDLG attack on a FedSGD observation under `threat`."""
  label_inference.check(cfg.labels, threat.batch_size)
  update_of = forward(apply_fn, threat)
  match = objectives.OBJECTIVES[cfg.objective]
  learn_labels = cfg.labels == "optimise"
  lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer)
  opt = {"adam": lambda: _adam(lr), "lbfgs": lambda: _lbfgs(lr),
         "lbfgs_zoom": _lbfgs_zoom}[cfg.optimizer]()

  # The optimised variables: the input, and the label logits when they are learned.
  def variables_of(x, logits):
    return (x, logits) if learn_labels else x

  def split(variables, logits):
    return variables if learn_labels else (variables, logits)

  def value_and_grad_at(obs: Observation, logits: jax.Array):
    def objective(variables):
      x, lg = split(variables, logits)
      return match(update_of(obs.params, x, jax.nn.softmax(lg)), obs.update)
    return jax.value_and_grad(objective)

  def draw(key: jax.Array) -> jax.Array:
    return jax.random.uniform(key, (threat.batch_size,) + tuple(threat.input_shape))

  def init(key: jax.Array, obs: Observation) -> DLGState:
    # without restart the key splits in two, as before restarts existed (same results)
    kx, ky, *kr = jax.random.split(key, 3 if cfg.restart else 2)
    x = draw(kx)
    if learn_labels:
      logits = jax.random.normal(ky, (threat.batch_size, threat.num_classes))
    else:
      y = label_inference.from_observation(cfg.labels, apply_fn, obs, threat, key=ky)
      logits = 1e3 * jax.nn.one_hot(y, threat.num_classes)  # softmax = one-hot
    variables = variables_of(x, logits)
    loss, grad = value_and_grad_at(obs, logits)(variables)
    return DLGState(x=x, label_logits=logits, opt_state=opt.init(variables, loss, grad),
                    loss=loss, grad=grad, diverged=~jnp.isfinite(loss),
                    counts=counted(no_counts(), double_backward=1),
                    key=kr[0] if cfg.restart else kx)

  def fresh_start(state: DLGState, obs: Observation) -> tuple[Any, jax.Array]:
    """L-BFGS restarted at a fresh random point (one evaluation), and the next key."""
    key, kx, ky = jax.random.split(state.key, 3)
    logits = (jax.random.normal(ky, state.label_logits.shape) if learn_labels
              else state.label_logits)
    variables = variables_of(draw(kx), logits)
    loss, grad = value_and_grad_at(obs, logits)(variables)
    return opt.init(variables, loss, grad), key

  def advance_restarting(state: DLGState, obs: Observation) -> DLGState:
    ended = state.opt_state.done
    if cfg.restart_after is not None:
      ended = ended | (state.opt_state.evaluations >= cfg.restart_after)
    opt_state, key = jax.lax.cond(
        ended, lambda s: fresh_start(s, obs),
        lambda s: (opt.step(s.opt_state, None, None, None,
                            value_and_grad_at(obs, s.label_logits))[3], s.key), state)
    evals = opt_state.evaluations - jnp.where(ended, 0, state.opt_state.evaluations)
    x, logits = split(opt_state.params, state.label_logits)
    ok = healthy(opt_state.value, x)
    opt_state = opt_state._replace(done=opt_state.done | ~ok)  # a bad start ends: restart
    better = ok & (opt_state.value < state.loss)
    best = jax.tree.map(lambda n, o: jnp.where(better, n, o),
                        (x, logits, opt_state.value, opt_state.grad),
                        (state.x, state.label_logits, state.loss, state.grad))
    x, logits, loss, grad = best
    return DLGState(x=x, label_logits=logits, opt_state=opt_state, loss=loss, grad=grad,
                    diverged=state.diverged,
                    counts=counted(state.counts, double_backward=evals), key=key)

  def advance(state: DLGState, obs: Observation) -> DLGState:
    variables, loss, grad, opt_state, evals = opt.step(
        state.opt_state, variables_of(state.x, state.label_logits), state.loss, state.grad,
        value_and_grad_at(obs, state.label_logits))
    x, logits = split(variables, state.label_logits)
    counts = counted(state.counts, double_backward=evals)  # spent whether or not kept
    new = DLGState(x=x, label_logits=logits, opt_state=opt_state, loss=loss, grad=grad,
                   diverged=state.diverged, counts=counts, key=state.key)
    return guard(new, state, healthy(loss, x))._replace(counts=counts)

  move = advance_restarting if cfg.restart else advance

  def step(state: DLGState, obs: Observation) -> tuple[DLGState, dict[str, jax.Array]]:
    new = jax.lax.cond(state.diverged, lambda s: s, lambda s: move(s, obs), state)
    return new, {"loss": new.loss, "diverged": new.diverged}

  return Attack(init, step)


def labels(state: DLGState) -> jax.Array:
  """The attack's label estimate for each reconstructed example."""
  return jnp.argmax(state.label_logits, axis=-1)

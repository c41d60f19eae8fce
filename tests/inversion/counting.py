"""The counting wrapper of the budget tests: the attacks' forward operator (the victim's
client update, `inversion.observation.forward`) with every executed evaluation recorded."""

from collections.abc import Callable

import jax

from inversion import observation as ob


def counting_forward(record: Callable[[jax.Array], object]):
  """`ob.forward` whose update calls `record(x)` on the host with the trial input, once per
  evaluation that runs (a `jax.debug.callback`: a step skipped under lax.cond is not
  counted). Patch it in as the attack module's `forward`."""

  def forward(apply_fn, threat):
    update_of = ob.forward(apply_fn, threat)

    def update(params, x, probs):
      jax.debug.callback(record, x)
      return update_of(params, x, probs)
    return update
  return forward

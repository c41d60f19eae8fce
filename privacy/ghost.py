"""Per-example clipping without per-example gradients of the whole model (ghost clipping).

The vmap path (`privacy.clipping.per_example_grads`) materialises every row's gradient,
`B x |params|` numbers, to take its norm. The norm needs less (Goodfellow 2015; Li et al.
2022, "ghost clipping"; Bu et al. 2023, "book-keeping"): a layer's parameter gradient for
row i is a product of what the layer saw and what came back, so its norm follows from
the layer's input `a_i` and output gradient `g_i`:

  - Dense, `a_i [T, d_in]`, `g_i [T, d_out]`: kernel norm^2 `sum_{t,s} (a_t.a_s)(g_t.g_s)`,
    which is `|a_i|^2 |g_i|^2` when T = 1 (no `d_in x d_out` product is formed), or the
    explicit `|a_i^T g_i|^2` when that is cheaper; bias norm^2 `|sum_t g_t|^2`.
  - Conv: the same with `a_i` the input's patches (one strided slice per kernel offset,
    T = output positions), choosing per layer the cheaper of `T^2` and `d_in x d_out`.
  - Any other layer that owns parameters (GroupNorm, a conv with groups or circular
    padding): its own parameters' per-row gradients, from the layer's vector-Jacobian
    product at row i alone (cheap for the small layers this is).

One pass gives every row's loss, the layers' inputs and, by one backward pass to the
layers' outputs only, their output gradients; the clip factors `c_i = min(1, C/|g_i|)`
then weight each layer's output gradients, and one batched VJP per layer gives its share
of the sum of clipped gradients `sum_i c_i grad_i`, without any `grad_i` (the weight
gradients a plain backward pass computes, with the rows weighted). Per-layer clipping
weights each parameter tensor by its own factors.

Semantics are the vmap path's exactly (tests: equal to 1e-5 on every model, flat and
per layer): row i is the batch of one `_one(batch, i)` under key `fold_in(key, i)`, a
masked row contributes 0, and a row whose gradient is not finite is dropped and counted.
A non-finite row's layer inputs and output gradients are zeroed before the weighted sums,
so its NaN cannot reach them.

Layers are found by intercepting Flax module calls (`nn.intercept_methods`). A model the
interception cannot cover (a parameter used outside any intercepted call, a layer called
more than once, a layer with non-array output or mutable state) is clipped by the vmap path, with one warning naming
the layer; a norm is never guessed.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear

from fljax.partitions import Batch
from privacy import clipping

Path = tuple[str, ...]


class GhostWarning(UserWarning):
  """Ghost clipping fell back to the vmap path (the message names the layer)."""


class GhostUnsupported(Exception):
  """A model whose per-row norms the interception cannot compute (the message names the
  layer)."""


@dataclasses.dataclass
class _Layer:
  path: Path
  module: nn.Module       # the bound module as called (its attributes, for the patches)


def _direct(tree: Any) -> dict[str, Any]:
  return {k: v for k, v in tree.items() if not isinstance(v, dict)}


def _get(params: Any, path: Path) -> Any:
  for name in path:
    params = params[name]
  return params


def _record(loss_fn, params, batch: Batch, key: jax.Array, perts: dict | None,
            layers: dict[Path, _Layer]):
  """Per-row losses `[B]` and the owning layers' inputs `{path: [B, 1, ...]}`, each
  layer's output plus `perts[path]` (zeros: its gradient is the output gradient)."""
  n = batch.mask.shape[0]

  def one(i, z):
    inputs: dict[Path, Any] = {}

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      own = _direct(module.variables.get("params", {}))
      if not own:
        return next_fun(*args, **kwargs)
      path = tuple(module.path)
      if set(module.variables) - {"params"}:
        raise GhostUnsupported(f"{type(module).__name__} at {'/'.join(path)} keeps state "
                               f"({', '.join(sorted(set(module.variables) - {'params'}))})")
      if kwargs or len(args) != 1:
        raise GhostUnsupported(f"{type(module).__name__} at {'/'.join(path)} takes more "
                               f"than one positional input")
      out = next_fun(*args, **kwargs)
      if not isinstance(out, jax.Array):
        raise GhostUnsupported(f"{type(module).__name__} at {'/'.join(path)} returns "
                               f"{type(out).__name__}, not one array")
      if path in inputs:  # weights shared between calls: its row gradient sums them
        raise GhostUnsupported(f"{type(module).__name__} at {'/'.join(path)} is called "
                               f"more than once")
      layers.setdefault(path, _Layer(path, module))
      inputs[path] = args[0]
      return out if z is None else out + z[path]

    with nn.intercept_methods(intercept):
      loss = loss_fn(params, clipping._one(batch, i), jax.random.fold_in(key, i))[0]
    return loss, inputs

  return jax.vmap(one)(jnp.arange(n), perts)


def _shapes(loss_fn, params, batch, key) -> tuple[dict[Path, _Layer], dict[Path, Any]]:
  """The owning layers (in call order) and zero perturbations shaped like their outputs."""
  layers: dict[Path, _Layer] = {}
  outs: dict[Path, Any] = {}

  def probe(p):
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name == "__call__" and _direct(module.variables.get("params", {})):
        outs[tuple(module.path)] = out
      return out
    with nn.intercept_methods(intercept):
      return _record(loss_fn, p, batch, key, None, layers)

  jax.eval_shape(probe, params)
  n = batch.mask.shape[0]
  zeros = {path: jnp.zeros((n,) + o.shape, o.dtype) for path, o in outs.items()}
  covered = {path + (leaf,) for path, layer in layers.items()
             for leaf in _direct(_get(params, path))}
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for kp, _ in flat:
    leaf = tuple(getattr(k, "key", str(k)) for k in kp)
    if leaf not in covered:
      raise GhostUnsupported(f"parameter {'/'.join(leaf)} is used outside any layer call "
                             f"the interception sees")
  return layers, zeros


def _varying_like(tree, refs):
  """`tree` marked varying over every mesh axis that a leaf of `refs` varies over (inside
  `jax.shard_map`; outside it, `tree` itself). Fresh zeros are replicated, and the
  gradient to a replicated value is summed over the mesh: the output gradients would be
  every device's rows added together."""
  axes = set()
  for leaf in jax.tree.leaves(refs):
    aval = jax.typeof(leaf)  # jax 0.10 keeps the varying axes in `.mat`, earlier in `.vma`
    axes |= set(aval.mat.varying if hasattr(aval, "mat") else getattr(aval, "vma", ()))
  return jax.lax.pcast(tree, tuple(sorted(axes)), to="varying") if axes else tree


def _patches(module: nn.Module, a: jax.Array) -> jax.Array | None:
  """A conv's input patches `[B, T, K]` (T output positions), or None where the layer's
  options need the general route."""
  if not isinstance(module, nn.Conv) or isinstance(module, nn.ConvTranspose):
    return None
  ks = tuple(module.kernel_size)
  rank = len(ks)
  dil_in = module.input_dilation
  if (module.feature_group_count != 1 or isinstance(module.padding, str)
      and module.padding in ("CIRCULAR", "CAUSAL") or a.ndim != rank + 2
      or (dil_in is not None and any(d != 1 for d in (
          (dil_in,) * rank if isinstance(dil_in, int) else dil_in)))):
    return None
  strides = module.strides or 1
  strides = (strides,) * rank if isinstance(strides, int) else tuple(strides)
  dil = module.kernel_dilation or 1
  dil = (dil,) * rank if isinstance(dil, int) else tuple(dil)
  pad = linear.canonicalize_padding(module.padding, rank)
  window = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
  if isinstance(pad, str):
    pad = jax.lax.padtype_to_pads(a.shape[1:-1], window, strides, pad)
  a = jnp.pad(a, ((0, 0),) + tuple(tuple(p) for p in pad) + ((0, 0),))
  out = [(n - w) // s + 1 for n, w, s in zip(a.shape[1:-1], window, strides)]
  # one strided slice per kernel offset (XLA:CPU's conv_general_dilated_patches is a
  # convolution with a one-hot kernel: K times the work of these copies)
  cols = []
  for offset in itertools.product(*(range(k) for k in ks)):
    start = (0,) + tuple(o * d for o, d in zip(offset, dil)) + (0,)
    limit = ((a.shape[0],) + tuple(st + (n - 1) * s + 1 for st, n, s in
                                   zip(start[1:-1], out, strides)) + (a.shape[-1],))
    cols.append(jax.lax.slice(a, start, limit, (1,) + strides + (1,)))
  p = jnp.stack(cols, axis=-2)  # [B, *out, K_spatial, C]
  return p.reshape(p.shape[0], -1, p.shape[-2] * p.shape[-1])


def _gram_norm2(a: jax.Array, g: jax.Array) -> jax.Array:
  """`|a_i^T g_i|_F^2` per row for `a [B, T, I]`, `g [B, T, O]`, the cheaper way."""
  t, i, o = a.shape[1], a.shape[2], g.shape[2]
  if t == 1:
    return jnp.sum(a[:, 0] ** 2, -1) * jnp.sum(g[:, 0] ** 2, -1)
  if t * t * (i + o) < t * i * o:
    return jnp.sum(jnp.einsum("bti,bsi->bts", a, a) * jnp.einsum("bto,bso->bts", g, g), (1, 2))
  return jnp.sum(jnp.einsum("bti,bto->bio", a, g) ** 2, (1, 2))


def _kernel_and_bias(own: dict) -> bool:
  """Whether a layer's own parameters are a kernel and at most a bias (a dense or conv
  layer the closed forms cover; any other layer goes through its per-row gradients)."""
  return set(own) <= {"kernel", "bias"} and "kernel" in own


def _layer_norms2(layer: _Layer, sub: dict, a: jax.Array, g: jax.Array) -> dict[str, jax.Array]:
  """Each of the layer's own parameters' squared per-row gradient norms `{leaf: [B]}`."""
  b = a.shape[0]
  a1, g1 = a.reshape((b,) + a.shape[2:]), g.reshape((b,) + g.shape[2:])
  own = _direct(sub)
  m = layer.module
  fast = _kernel_and_bias(own)
  if fast and isinstance(m, nn.Dense) and own["kernel"].ndim == 2:
    ga = g1.reshape(b, -1, g1.shape[-1])
    out = {"kernel": _gram_norm2(a1.reshape(b, -1, a1.shape[-1]), ga)}
  elif fast and (p := _patches(m, a1)) is not None:
    ga = g1.reshape(b, -1, g1.shape[-1])
    out = {"kernel": _gram_norm2(p, ga)}
  else:
    return {k: jnp.sum(v.reshape(b, -1) ** 2, 1) for k, v in _row_grads(layer, sub, a, g).items()}
  if "bias" in own:
    out["bias"] = jnp.sum(jnp.sum(ga, 1) ** 2, -1)
  return out


def _row_grads(layer: _Layer, sub: dict, a: jax.Array, g: jax.Array) -> dict[str, jax.Array]:
  """The layer's own parameters' per-row gradients `{leaf: [B, ...]}`, from its VJP at
  each row alone."""
  clone = layer.module.clone(parent=None)
  own = _direct(sub)

  def one(ai, gi):
    def f(p):
      return clone.apply({"params": {**sub, **p}}, ai)
    return jax.vjp(f, own)[1](gi)[0]

  return jax.vmap(one)(a, g)


def chunk_sum(loss_fn, params, batch: Batch, key: jax.Array, *, clip_norm: float | Any,
              per_layer: bool = False) -> tuple[Any, dict[str, jax.Array]]:
  """`privacy.clipping.vmap_chunk_sum` by ghost norms: the same clipped sum and raw
  metrics, without per-example gradients of the whole model.

  Raises `GhostUnsupported` (naming the layer) while tracing, for a model the
  interception cannot cover.
  """
  layers, zeros = _shapes(loss_fn, params, batch, key)
  zeros = _varying_like(zeros, (params, batch))

  def rows(p, z):
    return _record(loss_fn, p, batch, key, z, {})

  losses, vjp, inputs = jax.vjp(rows, params, zeros, has_aux=True)
  _, outgrads = vjp(jnp.ones_like(losses))  # to the layers' outputs only (the rest is unused)
  leaf_sq = {}
  for path, layer in layers.items():
    sub = _get(params, path)
    for leaf, sq in _layer_norms2(layer, sub, inputs[path], outgrads[path]).items():
      leaf_sq[path + (leaf,)] = sq
  norms = jnp.sqrt(sum(leaf_sq.values()))
  finite = jnp.isfinite(norms)
  valid = batch.mask > 0
  keep = (valid & finite).astype(norms.dtype)  # a dropped row's inputs are zeroed below
  if per_layer:
    limits = clipping.layer_clip_norms(params, clip_norm)
    weights = {k: keep * jnp.minimum(1.0, _get(limits, k) / jnp.maximum(jnp.sqrt(v), 1e-30))
               for k, v in leaf_sq.items()}
    active = sum(jnp.sqrt(v) > _get(limits, k) for k, v in leaf_sq.items()) > 0
  else:
    factor = keep * jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))
    weights = {k: factor for k in leaf_sq}
    active = norms > clip_norm
  total = params
  for path, layer in layers.items():
    sub = _get(params, path)
    a, g = (jnp.where(clipping._expand(keep > 0, x), x, 0.0)
            for x in (inputs[path], outgrads[path]))
    total = _set(total, path, _weighted(layer, sub, a, g, {
        leaf: weights[path + (leaf,)] for leaf in _direct(sub)}))
  finite_valid = valid & finite
  metrics = {
      "count": valid.sum().astype(jnp.float32),
      "nonfinite": (valid & ~finite).sum().astype(jnp.float32),
      "clipped": (active & finite_valid).sum().astype(jnp.float32),
      "norm_sum": jnp.where(finite_valid, norms, 0.0).sum(),
      "loss_sum": jnp.where(finite_valid, losses, 0.0).sum(),
  }
  return total, metrics


def clipped_grad_sum(loss_fn, params, batch: Batch, key: jax.Array, *, clip_norm: float | Any,
                     per_layer: bool = False, microbatch_size: int = 0, quiet: bool = False
                     ) -> tuple[Any, dict[str, jax.Array]]:
  """`privacy.clipping.clipped_grad_sum` by ghost norms (same arguments and result). A
  model the interception cannot cover is clipped by the vmap path, after one warning
  naming the layer (none with `quiet`, as `auto_clipped_grad_sum` asks)."""
  kwargs = dict(clip_norm=clip_norm, per_layer=per_layer, microbatch_size=microbatch_size)
  try:  # chunk_sum finds the layers while tracing, and raises there if it cannot cover one
    return clipping.clipped_grad_sum(loss_fn, params, batch, key, chunk_sum=chunk_sum,
                                     **kwargs)
  except GhostUnsupported as reason:
    if not quiet:
      warnings.warn(f"ghost clipping cannot cover this model ({reason}): its per-example "
                    f"gradients are clipped by the vmap path", GhostWarning, stacklevel=2)
  return clipping.clipped_grad_sum(loss_fn, params, batch, key, **kwargs)


def auto_clipped_grad_sum(loss_fn, params, batch: Batch, key: jax.Array, *,
                          clip_norm: float | Any, per_layer: bool = False,
                          microbatch_size: int = 0) -> tuple[Any, dict[str, jax.Array]]:
  """The default: ghost norms where they cover the model, else the vmap path, silently.

  Chosen by measurement on 2 CPU cores (docs/privacy.md): in the isolated peer benchmark
  (`scripts/bench_vs_torch.py`) ghost norms were 1.26-1.31x faster than vmap on the MNIST
  CNN and 1.32-1.35x on the LeNet; `scripts/bench_ghost.py` once measured 0.95x on the
  LeNet, under load. The result is the same sum (tests: to 1e-5)."""
  return clipped_grad_sum(loss_fn, params, batch, key, clip_norm=clip_norm,
                          per_layer=per_layer, microbatch_size=microbatch_size, quiet=True)


def _weighted(layer: _Layer, sub: dict, a: jax.Array, g: jax.Array,
              weights: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`sum_i w_i grad_i` for each of the layer's own parameters, each leaf with its own row
  weights: a dense or conv layer's by one batched VJP of the layer with the output
  gradients weighted (what the model's backward pass would compute with the rows
  weighted), any other layer's from its per-row gradients."""
  own = _direct(sub)
  m = layer.module
  if not (_kernel_and_bias(own) and isinstance(m, (nn.Dense, nn.Conv))):
    grads = _row_grads(layer, sub, a, g)
    return {k: jnp.tensordot(weights[k], v, axes=1) for k, v in grads.items()}
  b = a.shape[0]
  a1, g1 = a.reshape((b,) + a.shape[2:]), g.reshape((b,) + g.shape[2:])
  clone = m.clone(parent=None)
  kernel = jax.vjp(lambda k: clone.apply({"params": {**sub, "kernel": k}}, a1), own["kernel"]
                   )[1](clipping._expand(weights["kernel"], g1) * g1)[0]
  out = {"kernel": kernel}
  if "bias" in own:
    per_row = jnp.sum(g1.reshape(b, -1, g1.shape[-1]), 1)
    out["bias"] = jnp.tensordot(weights["bias"], per_row, axes=1).reshape(own["bias"].shape)
  return out


def _set(tree: dict, path: Path, leaves: dict) -> dict:
  if not path:
    return {**tree, **leaves}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], leaves)}


def supported(loss_fn, params, batch: Batch, key: jax.Array) -> str | None:
  """None when ghost clipping covers the model, else the reason (naming the layer)."""
  try:
    _shapes(loss_fn, params, batch, key)
  except GhostUnsupported as e:
    return str(e)
  return None



# the per-example clipping implementations, by name (DPSGDConfig.clipping, --privacy.clipping)
CLIPPING = {"auto": auto_clipped_grad_sum, "vmap": clipping.clipped_grad_sum,
            "ghost": clipped_grad_sum}

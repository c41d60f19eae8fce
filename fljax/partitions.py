"""Client partitions of a dataset: i.i.d., Dirichlet label skew, shards, quantity skew.

- `iid`: a random permutation cut into near-equal parts.
- `dirichlet(alpha)`: label skew as in NIID-Bench (Li et al., ICDE 2022): for every class a
  vector of client proportions is drawn from Dir(alpha), clients already holding N/C
  examples get no more, and the draw is repeated until every client has `min_size`
  examples. Small alpha (0.1) is extreme skew, large alpha (100) is close to i.i.d.
- `dirichlet_per_client(alpha)`: the same skew drawn per client (Hsu et al. 2019), with
  equal client sizes; it always fits, so it is the one for thousands of small clients.
- `shards(k)`: the pathological split of McMahan et al. (AISTATS 2017): sort by label, cut
  into C*k shards, give each client k random shards (so at most k classes each).
- `quantity_skew`: i.i.d. labels but client sizes drawn from Dir(beta) proportions
  (NIID-Bench) or a log-normal(0, sigma) (as in LEAF/FedProx style experiments).

A partition is a list of index arrays. `make_clients` turns it into padded arrays
`[C, N_max, ...]` with a mask, so that clients can be vmapped. Randomness comes from a
`jax.random` key, converted once into a local NumPy generator (no global state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

Partition = list[np.ndarray]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Batch:
  """Examples with a validity mask: `x [..., N, H, W, C]`, `y [..., N]`, `mask [..., N]`.

  One batch has no leading axes; the clients of a partition are a `Batch` with a leading
  client axis, `x [C, N_max, H, W, C]`, where rows past a client's count are zeros with
  mask 0. Client i is `jax.tree.map(lambda a: a[i], clients)`.
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array

  @property
  def counts(self) -> jax.Array:
    return self.mask.sum(axis=-1)

  @property
  def num_clients(self) -> int:
    return self.mask.shape[0]


ClientData = Batch  # the clients of a partition: a Batch with a leading client axis


def _rng(key: jax.Array) -> np.random.Generator:
  """A local NumPy generator seeded from the bits of a jax key."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _check_clients(num_examples: int, num_clients: int) -> None:
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if num_clients > num_examples:
    raise ValueError(f"{num_clients} clients but only {num_examples} examples: "
                     f"use at most {num_examples} clients or more data")


def iid(labels: np.ndarray, num_clients: int, *, key: jax.Array) -> Partition:
  """Uniformly random, near-equal client shards (sizes differ by at most one)."""
  _check_clients(len(labels), num_clients)
  perm = _rng(key).permutation(len(labels))
  return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, *, key: jax.Array, alpha: float,
              min_size: int = 10, max_tries: int = 1000) -> Partition:
  """NIID-Bench label skew: per class, client proportions ~ Dir(alpha).

  Args:
    labels: `[N]` int labels.
    num_clients: number of clients C.
    key: a jax random key.
    alpha: Dirichlet concentration (> 0); smaller is more skewed.
    min_size: every client gets at least this many examples (NIID-Bench uses 10); it is
      lowered to N // C when the data cannot give that many to every client.
    max_tries: redraws allowed to meet `min_size` before a ValueError.
  """
  _check_alpha(alpha)
  n = len(labels)
  _check_clients(n, num_clients)
  min_size = min(min_size, n // num_clients)
  rng = _rng(key)
  classes = np.unique(labels)
  for _ in range(max_tries):
    sizes = np.zeros(num_clients, np.int64)
    chunks = []  # (the class's shuffled indices, each one's client)
    for c in classes:
      idx = np.flatnonzero(labels == c)
      rng.shuffle(idx)
      p = rng.dirichlet(np.full(num_clients, alpha))
      # NIID-Bench's balancing: a client that already has N/C examples gets no more.
      p = p * (sizes < n / num_clients)
      p = p / p.sum()
      cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
      counts = np.diff(np.concatenate([[0], cuts, [len(idx)]]))
      sizes += counts
      chunks.append((idx, np.repeat(np.arange(num_clients), counts)))
    if sizes.min() >= min_size:
      return _group(np.concatenate([i for i, _ in chunks]),
                    np.concatenate([o for _, o in chunks]), num_clients)
  raise ValueError(f"could not give every one of {num_clients} clients {min_size} examples "
                   f"in {max_tries} Dirichlet({alpha}) draws; lower min_size or num_clients, "
                   f"or use the partition dirichlet_per_client, which always fits")


def dirichlet_per_client(labels: np.ndarray, num_clients: int, *, key: jax.Array,
                         alpha: float) -> Partition:
  """Label skew as in Hsu et al. (2019): each client's class mix is drawn from
  Dir(alpha K p) (K classes, p their frequencies: concentration alpha per class when they
  are balanced, the skew of NIID-Bench's split), and every client gets N // C or N // C + 1
  examples, drawn from its mix renormalised over the classes not yet used up.

  It always fits: every example goes to exactly one client and every client gets its size,
  at any C <= N, where `dirichlet`'s per-class draw cannot give thousands of small clients
  their minimum. Clients are filled in a random order; the last ones filled find some
  classes used up, so their mix is the most distorted (randomly chosen clients).
  """
  _check_alpha(alpha)
  n = len(labels)
  _check_clients(n, num_clients)
  rng = _rng(key)
  classes, counts = np.unique(labels, return_counts=True)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  mixes = rng.dirichlet(alpha * len(classes) * counts / n, size=num_clients)
  sizes = np.full(num_clients, n // num_clients)
  sizes[:n % num_clients] += 1
  remaining, taken = counts.copy(), np.zeros((num_clients, len(classes)), np.int64)
  for i in rng.permutation(num_clients):
    need = sizes[i]
    while need:
      left = remaining > 0
      p = mixes[i] * left
      p = p / p.sum() if p.sum() > 0 else left / left.sum()
      take = np.minimum(rng.multinomial(need, p), remaining)
      taken[i] += take
      remaining -= take
      need -= take.sum()
  # Every example is taken: client i gets the next taken[i, c] of class c's shuffled pool.
  owner = np.concatenate([np.repeat(np.arange(num_clients), taken[:, c])
                          for c in range(len(classes))])
  return _group(np.concatenate(pools), owner, num_clients)


def _check_alpha(alpha: float) -> None:
  if not alpha > 0:
    raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")


def _group(idx: np.ndarray, owner: np.ndarray, num_clients: int) -> Partition:
  """The sorted indices of each client, from every index and its client."""
  order = np.lexsort((idx, owner))
  bounds = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
  return [part.astype(np.int64) for part in np.split(idx[order], bounds)]


def shards(labels: np.ndarray, num_clients: int, *, key: jax.Array, k: int = 2) -> Partition:
  """McMahan et al.'s pathological non-i.i.d. split: k label-sorted shards per client."""
  num_classes = len(np.unique(labels))
  if not 1 <= k <= num_classes:
    raise ValueError(f"shards per client k must be in [1, {num_classes}] (the number of "
                     f"classes), got {k}")
  _check_clients(len(labels), num_clients)
  if num_clients * k > len(labels):
    raise ValueError(f"{num_clients} clients x {k} shards exceeds the {len(labels)} examples; "
                     f"use fewer clients or shards")
  rng = _rng(key)
  # Stable sort by label, ties broken randomly, so shards are label-pure where possible.
  order = np.lexsort((rng.permutation(len(labels)), labels))
  pieces = np.array_split(order, num_clients * k)
  assignment = rng.permutation(num_clients * k).reshape(num_clients, k)
  return [np.sort(np.concatenate([pieces[s] for s in row])) for row in assignment]


def quantity_skew(labels: np.ndarray, num_clients: int, *, key: jax.Array,
                  method: str = "dirichlet", beta: float = 0.5, sigma: float = 1.0,
                  min_size: int = 1) -> Partition:
  """I.i.d. labels, skewed client sizes: proportions ~ Dir(beta) or log-normal(0, sigma)."""
  n = len(labels)
  _check_clients(n, num_clients)
  if num_clients * min_size > n:
    raise ValueError(f"{num_clients} clients x min_size {min_size} exceeds {n} examples")
  rng = _rng(key)
  if method == "dirichlet":
    if not beta > 0:
      raise ValueError(f"quantity-skew beta must be > 0, got {beta}")
    p = rng.dirichlet(np.full(num_clients, beta))
  elif method == "lognormal":
    if not sigma > 0:
      raise ValueError(f"quantity-skew sigma must be > 0, got {sigma}")
    p = rng.lognormal(0.0, sigma, num_clients)
    p = p / p.sum()
  else:
    raise ValueError(f"quantity-skew method must be 'dirichlet' or 'lognormal', got {method!r}")
  # Every client gets min_size; the rest is spread by the drawn proportions.
  extra = n - num_clients * min_size
  sizes = min_size + np.floor(p * extra).astype(int)
  remainder = n - sizes.sum()
  sizes[np.argsort(-(p * extra - np.floor(p * extra)))[:remainder]] += 1
  perm = rng.permutation(n)
  return [np.sort(part) for part in np.split(perm, np.cumsum(sizes)[:-1])]


PARTITIONS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "dirichlet_per_client": dirichlet_per_client,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def partition(name: str, labels: np.ndarray, num_clients: int, *, key: jax.Array,
              **kwargs) -> Partition:
  """Looks `name` up in `PARTITIONS` and calls it."""
  if name not in PARTITIONS:
    raise ValueError(f"unknown partition {name!r}; choose one of {sorted(PARTITIONS)}")
  return PARTITIONS[name](np.asarray(labels), num_clients, key=key, **kwargs)


def make_clients(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray],
                 n_max: int | None = None) -> Batch:
  """Gathers a partition into padded arrays `[C, N_max, ...]` with a 0/1 float mask."""
  sizes = [len(p) for p in parts]
  n_max = n_max or max(sizes)
  if n_max < max(sizes):
    raise ValueError(f"n_max={n_max} is smaller than the largest client ({max(sizes)})")
  c = len(parts)
  xs = np.zeros((c, n_max) + x.shape[1:], x.dtype)
  ys = np.zeros((c, n_max), np.int32)
  mask = np.zeros((c, n_max), np.float32)
  for i, p in enumerate(parts):
    xs[i, :len(p)] = x[p]
    ys[i, :len(p)] = y[p]
    mask[i, :len(p)] = 1.0
  return Batch(x=xs, y=ys, mask=mask)


def label_histogram(y: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
  """`[C, K]` counts of each label on each client."""
  return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])


def label_skew(hist: np.ndarray) -> float:
  """Mean total-variation distance between client label distributions and the global one.

  0 for perfectly i.i.d. clients, approaching 1 - 1/K when each client holds one class.
  """
  hist = np.asarray(hist, np.float64)
  glob = hist.sum(0) / hist.sum()
  local = hist / np.maximum(hist.sum(1, keepdims=True), 1)
  return float(0.5 * np.abs(local - glob).sum(1).mean())


def format_histogram(hist: np.ndarray, max_rows: int = 20) -> str:
  """Text table of a label histogram (first `max_rows` clients) with totals."""
  c, k = hist.shape
  head = "client " + " ".join(f"{j:>5d}" for j in range(k)) + "   total"
  lines = [head]
  for i in range(min(c, max_rows)):
    lines.append(f"{i:>6d} " + " ".join(f"{v:>5d}" for v in hist[i]) + f" {hist[i].sum():>7d}")
  if c > max_rows:
    lines.append(f"   ... ({c - max_rows} more clients)")
  lines.append(" total " + " ".join(f"{v:>5d}" for v in hist.sum(0)) + f" {hist.sum():>7d}")
  sizes = hist.sum(1)
  lines.append(f"clients={c} size min/median/max={sizes.min()}/{int(np.median(sizes))}/"
               f"{sizes.max()} label_skew(TV)={label_skew(hist):.3f}")
  return "\n".join(lines)

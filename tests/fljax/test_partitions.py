"""Tests of fljax/partitions.py: coverage, skew, determinism, errors, padding, histograms."""

import jax
import numpy as np
import pytest

from fljax import partitions

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 100 per class
KEY = jax.random.key(0)

CASES = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "dirichlet_per_client": {"alpha": 0.5},
    "shards": {"k": 2},
    "quantity_skew": {"method": "dirichlet", "beta": 0.5},
    "quantity_skew_lognormal": {"method": "lognormal", "sigma": 1.0},
}


def _run(name, key=KEY, num_clients=20, **kwargs):
  kwargs = {**CASES[name], **kwargs}
  return partitions.partition(name.removesuffix("_lognormal"), LABELS, num_clients, key=key,
                              **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_example_exactly_once(name):
  parts = _run(name)
  assert len(parts) == 20
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
  assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("name,kwargs", [("iid", {}), ("shards", {"k": 2}),
                                         ("dirichlet_per_client", {"alpha": 0.5}),
                                         ("dirichlet_per_client", {"alpha": 0.1})])
def test_six_thousand_clients_keep_every_example_once(name, kwargs):
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 6000))
  parts = partitions.partition(name, labels, 6000, key=KEY, **kwargs)
  assert len(parts) == 6000 and {len(p) for p in parts} == {10}
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
  if name == "dirichlet_per_client":  # skewed: a median client holds few of the 10 classes
    classes = (partitions.label_histogram(labels, parts, 10) > 0).sum(axis=1)
    assert np.median(classes) <= (5 if kwargs["alpha"] == 0.5 else 2)


def test_dirichlet_per_client_has_niid_benchs_skew():
  skew = {(name, a): partitions.label_skew(partitions.label_histogram(
      LABELS, _run(name, alpha=a), 10)) for name in ("dirichlet", "dirichlet_per_client")
      for a in (0.1, 0.5, 100.0)}
  for a in (0.1, 0.5):  # the same skew, within 0.05 of total variation
    assert abs(skew["dirichlet_per_client", a] - skew["dirichlet", a]) < 0.05
  # near i.i.d. at alpha 100 (50 examples a client: sampling noise alone gives about 0.17)
  assert skew["dirichlet_per_client", 0.1] > skew["dirichlet_per_client", 0.5] > 0.4 > (
      skew["dirichlet_per_client", 100.0])


def test_niid_bench_dirichlet_that_cannot_fit_points_to_the_per_client_split():
  with pytest.raises(ValueError, match="use the partition dirichlet_per_client"):
    partitions.dirichlet(LABELS, 400, key=KEY, alpha=0.1, min_size=2, max_tries=20)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_key_same_split(name):
  a, b = _run(name), _run(name)
  c = _run(name, key=jax.random.key(1))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_label_skew_grows_as_alpha_shrinks():
  skew = {}
  for alpha in (100.0, 1.0, 0.5, 0.1):
    hists = [partitions.label_histogram(LABELS, _run("dirichlet", key=jax.random.key(s), alpha=alpha,
                                                     min_size=5), 10) for s in range(3)]
    skew[alpha] = np.mean([partitions.label_skew(h) for h in hists])
  iid = partitions.label_skew(partitions.label_histogram(LABELS, _run("iid"), 10))
  assert iid < skew[0.5]  # sampling noise only (~0.16 at 50 examples per client)
  assert skew[100.0] < skew[1.0] < skew[0.5] < skew[0.1]
  assert skew[0.1] > 0.5  # most of a client's data comes from a few classes


def test_dirichlet_min_size():
  parts = _run("dirichlet", alpha=0.1, min_size=10)
  assert min(len(p) for p in parts) >= 10


def test_shards_have_at_most_k_classes():
  parts = _run("shards", k=2)  # 40 shards of 25: each shard holds one class
  hist = partitions.label_histogram(LABELS, parts, 10)
  assert ((hist > 0).sum(1) <= 2).all()
  assert (hist.sum(1) == 50).all()


def test_quantity_skew_sizes_vary_labels_do_not():
  parts = _run("quantity_skew", beta=0.3)
  sizes = np.array([len(p) for p in parts])
  assert sizes.max() > 3 * np.median(sizes)
  hist = partitions.label_histogram(LABELS, parts, 10)
  big = hist[sizes.argmax()]
  assert (big > 0).sum() == 10  # the largest client sees every class


@pytest.mark.parametrize("call, message", [
    (lambda: _run("dirichlet", alpha=0.0), "alpha must be > 0"),
    (lambda: _run("dirichlet", alpha=-1.0), "alpha must be > 0"),
    (lambda: _run("iid", num_clients=1001), "only 1000 examples"),
    (lambda: _run("iid", num_clients=0), "num_clients must be >= 1"),
    (lambda: _run("shards", k=11), "number of classes"),
    (lambda: _run("shards", k=0), "number of classes"),
    (lambda: _run("shards", k=10, num_clients=101), "shards"),
    (lambda: _run("quantity_skew", beta=0.0), "beta must be > 0"),
    (lambda: _run("quantity_skew", method="zipf"), "method"),
    (lambda: partitions.partition("pathological", LABELS, 4, key=KEY), "unknown partition"),
])
def test_bad_parameters_raise_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_make_clients_pads_with_mask():
  x = np.arange(1000, dtype=np.float32).reshape(1000, 1, 1, 1)
  parts = _run("quantity_skew", num_clients=5)
  clients = partitions.make_clients(x, LABELS, parts)
  n_max = max(len(p) for p in parts)
  assert clients.x.shape == (5, n_max, 1, 1, 1) and clients.mask.shape == (5, n_max)
  np.testing.assert_array_equal(clients.counts, [len(p) for p in parts])
  for i, p in enumerate(parts):
    np.testing.assert_array_equal(clients.x[i, :len(p), 0, 0, 0], x[p, 0, 0, 0])
    np.testing.assert_array_equal(clients.y[i, :len(p)], LABELS[p])
    assert (clients.x[i, len(p):] == 0).all() and (clients.mask[i, len(p):] == 0).all()


def test_histogram_text_and_png(tmp_path):
  from fljax import plots
  parts = _run("dirichlet", alpha=0.1)
  hist = partitions.label_histogram(LABELS, parts, 10)
  assert hist.shape == (20, 10) and hist.sum() == 1000
  text = partitions.format_histogram(hist, max_rows=5)
  assert "total" in text and "15 more clients" in text and "label_skew" in text
  plots.plot_label_histogram(hist, str(tmp_path / "h.png"))
  assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

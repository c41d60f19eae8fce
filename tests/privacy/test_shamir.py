"""Tests of privacy/shamir.py: reconstruction from any t shares, nothing from t - 1."""

import itertools
import os

import pytest

from privacy import shamir


def test_any_t_shares_reconstruct():
  secret = b"\x00\x01" + os.urandom(30)  # leading zero bytes survive
  shares = shamir.share(secret, 3, range(1, 6))
  for subset in itertools.combinations(shares.items(), 3):
    assert shamir.reconstruct(dict(subset), 3) == secret
  with pytest.raises(shamir.ShamirError, match="need 3 shares"):
    shamir.reconstruct(dict(list(shares.items())[:2]), 3)


def test_fewer_than_t_shares_are_consistent_with_every_secret():
  # t - 1 shares plus ANY candidate secret lie on one polynomial of degree t - 1: the
  # shares rule out no secret, so they reveal nothing about it.
  shares = shamir.share(os.urandom(32), 3, range(1, 6))
  two = dict(list(shares.items())[:2])
  for candidate in (b"", os.urandom(32), b"\xff" * 32):
    with_candidate = {**two, PRIME_ZERO: int.from_bytes(shamir._frame(candidate), "big")}
    fake = _interpolate(with_candidate)
    assert all(fake(x) == y for x, y in with_candidate.items())


PRIME_ZERO = 0


def _interpolate(points):
  p = shamir.PRIME

  def f(x):
    total = 0
    for xj, yj in points.items():
      num = den = 1
      for xm in points:
        if xm != xj:
          num = num * (x - xm) % p
          den = den * (xj - xm) % p
      total = (total + yj * num * pow(den, -1, p)) % p
    return total
  return f


def test_single_share_is_uniform_whatever_the_secret():
  # With t = 2, one share of the all-zero secret and one of the all-one secret have the
  # same (uniform) distribution: compare low bytes with a chi-square statistic.
  from scipy import stats
  for secret in (b"\x00" * 32, b"\xff" * 32):
    low = [shamir.share(secret, 2, [1, 2])[1] % 16 for _ in range(3200)]
    counts = [low.count(i) for i in range(16)]
    assert stats.chisquare(counts).pvalue > 1e-4


def test_inconsistent_shares_and_bad_parameters():
  shares = shamir.share(b"secret", 2, [1, 2, 3])
  shares[1] = (shares[1] + 1) % shamir.PRIME
  with pytest.raises(shamir.ShamirError):
    shamir.reconstruct({1: shares[1], 2: shares[2]}, 2)
  with pytest.raises(shamir.ShamirError, match="threshold"):
    shamir.share(b"x", 4, [1, 2, 3])
  with pytest.raises(shamir.ShamirError, match="distinct"):
    shamir.share(b"x", 2, [1, 1, 2])

"""Tests of privacy/shamir.py: reconstruction from any t shares, nothing from t - 1, and
tampered shares caught by the check value."""

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


def _lagrange_at(points, x):
  """The value at x of the polynomial of degree < len(points) through `points` {x: y}."""
  p, total = shamir.PRIME, 0
  for xj, yj in points.items():
    num = den = 1
    for xm in points:
      if xm != xj:
        num = num * (x - xm) % p
        den = den * (xj - xm) % p
    total = (total + yj * num * pow(den, -1, p)) % p
  return total


def test_fewer_than_t_shares_are_consistent_with_every_secret():
  # t - 1 = 2 shares plus ANY candidate secret lie on a polynomial of degree t - 1: its
  # value at a third id is a share that, with the two real ones, reconstructs the
  # candidate. So the two shares rule out no secret, they reveal nothing about it.
  secret = os.urandom(32)
  shares = shamir.share(secret, 3, range(1, 6))
  two = {1: shares[1], 2: shares[2]}
  for candidate in (b"", os.urandom(32), b"\xff" * 32, secret):
    fake = _lagrange_at({**two, 0: int.from_bytes(shamir._frame(candidate), "big")}, 3)
    assert shamir.reconstruct({**two, 3: fake}, 3) == candidate
    assert (fake == shares[3]) == (candidate == secret)  # another polynomial, same two shares


def test_single_share_is_uniform_whatever_the_secret():
  # With t = 2, one share of the all-zero secret and one of the all-one secret have the
  # same (uniform) distribution: compare low bytes with a chi-square statistic.
  from scipy import stats
  for secret in (b"\x00" * 32, b"\xff" * 32):
    low = [shamir.share(secret, 2, [1, 2])[1] % 16 for _ in range(3200)]
    counts = [low.count(i) for i in range(16)]
    assert stats.chisquare(counts).pvalue > 1e-4


def test_a_changed_share_is_detected_by_the_check_value():
  # Shift share 1 so that the interpolated constant term moves by exactly one unit of the
  # secret's last byte: the framing (0x01 prefix, length) stays valid, only the digest
  # framed with the secret can tell.
  secret = b"\x10" * 32
  shares = shamir.share(secret, 2, [1, 2])
  lam1 = 2 * pow(2 - 1, -1, shamir.PRIME) % shamir.PRIME  # Lagrange weight of id 1 at 0, {1, 2}
  delta = 1 << (8 * shamir.CHECK_BYTES)
  forged = {1: (shares[1] + delta * pow(lam1, -1, shamir.PRIME)) % shamir.PRIME, 2: shares[2]}
  raw = _lagrange_at(forged, 0).to_bytes(shamir.SHARE_BYTES, "big").lstrip(b"\x00")
  assert raw[0] == 1 and raw[1:-shamir.CHECK_BYTES] == b"\x10" * 31 + b"\x11"  # a framed secret
  with pytest.raises(shamir.ShamirError, match="inconsistent"):
    shamir.reconstruct(forged, 2)
  assert shamir.reconstruct(shares, 2) == secret


def test_inconsistent_shares_and_bad_parameters():
  shares = shamir.share(b"secret", 2, [1, 2, 3])
  shares[1] = (shares[1] + 1) % shamir.PRIME
  with pytest.raises(shamir.ShamirError):
    shamir.reconstruct({1: shares[1], 2: shares[2]}, 2)
  with pytest.raises(shamir.ShamirError, match="threshold"):
    shamir.share(b"x", 4, [1, 2, 3])
  with pytest.raises(shamir.ShamirError, match="distinct"):
    shamir.share(b"x", 2, [1, 1, 2])

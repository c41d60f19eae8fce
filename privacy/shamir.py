"""Shamir t-of-n secret sharing (Shamir, CACM 1979) over the prime field GF(2^521 - 1).

A secret s (up to 56 bytes, e.g. a 32-byte X25519 key or PRG seed) is the constant term of
a random polynomial f of degree t - 1; participant i (an integer id >= 1) gets f(i). Any t
shares give s by Lagrange interpolation at 0; any t - 1 shares are independent of s
(uniform in the field), so they reveal nothing. Coefficients come from `secrets` (the OS
CSPRNG), never from numpy.random.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping

PRIME = 2 ** 521 - 1  # a Mersenne prime
CHECK_BYTES = 8  # a digest framed with every secret, so inconsistent shares are detected
SECRET_BYTES = 56  # 1 + 56 + CHECK_BYTES = 65 bytes < 2^521
SHARE_BYTES = 66


class ShamirError(ValueError):
  """Bad parameters or too few / inconsistent shares."""


def share(secret: bytes, t: int, ids: Iterable[int]) -> dict[int, int]:
  """Splits `secret` into shares {id: f(id)} so that any t of them recover it."""
  ids = list(ids)
  if not 1 <= t <= len(ids):
    raise ShamirError(f"threshold t must be in [1, {len(ids)}], got {t}")
  if len(set(ids)) != len(ids) or any(not 0 < i < PRIME for i in ids):
    raise ShamirError("participant ids must be distinct integers >= 1")
  if len(secret) > SECRET_BYTES:
    raise ShamirError(f"secret longer than {SECRET_BYTES} bytes")
  coeffs = [int.from_bytes(_frame(secret), "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
  shares = {}
  for i in ids:
    acc = 0
    for c in reversed(coeffs):  # Horner
      acc = (acc * i + c) % PRIME
    shares[i] = acc
  return shares


def reconstruct(shares: Mapping[int, int], t: int) -> bytes:
  """The secret from at least t shares {id: value} (uses the first t)."""
  if len(shares) < t:
    raise ShamirError(f"need {t} shares to reconstruct, got {len(shares)}")
  points = list(shares.items())[:t]
  secret = 0
  for j, (xj, yj) in enumerate(points):
    num, den = 1, 1
    for m, (xm, _) in enumerate(points):
      if m != j:
        num = num * (-xm) % PRIME
        den = den * (xj - xm) % PRIME
    secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
  raw = secret.to_bytes(SHARE_BYTES, "big").lstrip(b"\x00")
  secret = raw[1:-CHECK_BYTES]
  if raw[:1] != b"\x01" or _frame(secret) != raw:
    raise ShamirError("shares are inconsistent (they do not lie on one polynomial of a secret)")
  return secret


def _frame(secret: bytes) -> bytes:
  """0x01 (keeps leading zero bytes of the secret) + secret + a digest of it (makes shares
  that do not belong together fail, except with probability 2^-64)."""
  return b"\x01" + secret + hashlib.blake2b(secret, digest_size=CHECK_BYTES).digest()


def to_bytes(value: int) -> bytes:
  return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
  if len(data) != SHARE_BYTES:
    raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
  return int.from_bytes(data, "big")

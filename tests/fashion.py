"""`needs_fashion_mnist`: skips a test when the Fashion-MNIST IDX files are not where
`fljax.datasets` looks for them (`$FLJAX_FASHION_MNIST_DIR`, else Debian's folder)."""

import os
from pathlib import Path

import pytest

from fljax import datasets

_ROOT = Path(os.environ.get("FLJAX_FASHION_MNIST_DIR", datasets.FASHION_MNIST_DIR))

needs_fashion_mnist = pytest.mark.skipif(
    not any((_ROOT / f"train-images-idx3-ubyte{gz}").exists() for gz in (".gz", "")),
    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")

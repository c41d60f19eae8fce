"""`needs_fashion_mnist`: skips a test when the Fashion-MNIST IDX files are not where
`fljax.datasets` looks for them (`datasets.fashion_mnist_dir`)."""

import pytest

from fljax import datasets

needs_fashion_mnist = pytest.mark.skipif(
    not datasets.has_fashion_mnist(),
    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")

"""fljax: offline datasets, client partitions, Flax models and federated simulation in JAX.

The bottom layer of the project: `privacy`, `diffusion` and `inversion` build on it, and
it imports none of them. Modules: `datasets`, `partitions`, `models`, `federated`,
`checkpoint`, `runs` (the run infrastructure every trainer shares), `train`, `config`,
`plots`.
"""

__version__ = "0.1.0"

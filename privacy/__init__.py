"""Privacy mechanisms for federated learning: clipping, noise, accounting, secure aggregation.

Filled by later issues; imports only from `fljax`.
"""

"""Attacks as `init(key, observation) -> state`, `step(state, observation) -> (state, metrics)`."""

"""The streaming buffer between rollout and trainer."""

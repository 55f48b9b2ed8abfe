"""Rollout: generation engines and the rollout worker actor."""

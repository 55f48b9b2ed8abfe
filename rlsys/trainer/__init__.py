"""Trainer: advantages, losses, logprobs and the trainer worker actor."""

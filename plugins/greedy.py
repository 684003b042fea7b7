"""Greedy decoding: the most likely token, every time (what temperature 0 means)."""

import numpy as np


def greedy(logits: np.ndarray) -> np.ndarray:
    """``[B, V]`` logits -> ``[B]`` ids of each row's largest logit (the first on a tie)."""
    return np.argmax(logits, axis=-1)

"""nextoken's built-in plugins: the decoding strategies, stop conditions, tokenizers and cost
meters that ship with it, written the way a third-party plugin is."""

from .greedy import greedy

#: Decoding strategies by name: each maps the batch's logits ``[B, V]`` to next token ids ``[B]``.
STRATEGIES = {"greedy": greedy}

__all__ = ["STRATEGIES", "greedy"]

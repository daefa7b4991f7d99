"""Seeded task generators and the word-level tokenizer of mechkit's bundled models.

- ``ioi(tokenizer, n, seed)`` -> ``PatchingTask`` (indirect-object identification)
- ``repeated_tokens(tokenizer, n, T, seed)`` -> LongTensor [n, 1 + 2T]
- ``sentiment(tokenizer, n, seed)`` -> ``.positive``, ``.negative``, ``.neutral``
- ``build_tokenizer()`` -> the word-level ``PreTrainedTokenizerFast``
"""

from .base import PatchingTask
from .ioi import ioi
from .repeated import induction_task, repeated_tokens
from .sentiment import sentiment
from .tokenizer import build_tokenizer, save_tokenizer

__all__ = ["PatchingTask", "induction_task", "ioi", "repeated_tokens", "sentiment", "build_tokenizer", "save_tokenizer"]

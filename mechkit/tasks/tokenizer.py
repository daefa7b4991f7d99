"""mechkit's word-level tokenizer (the one the bundled models use).

One token per word of ``vocab.vocabulary()``; text is split on whitespace and each
punctuation mark is a token of its own. ``tok("Mary went home .")`` gives
``[<bos>, Mary, went, home, .]``: the post-processor prepends ``<bos>`` (pass
``add_special_tokens=False`` to leave it out). Decoding joins words with spaces and drops
the space before punctuation.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from .vocab import vocabulary


def build_raw_tokenizer() -> Tokenizer:
    """The ``tokenizers.Tokenizer`` (WordLevel model) behind ``build_tokenizer``."""
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    # WordLevel has no decoder of its own: join with spaces, then glue punctuation back
    # (the WordPiece decoder does exactly that: " ".join, then " ." -> "." etc.)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>", "<unk>"])
    return tok


def build_tokenizer():
    """The word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    ``bos_token``/``eos_token``/``pad_token``/``unk_token`` are set; ``padding_side`` is
    ``"left"`` so that the last position of every padded row is its last real token.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_raw_tokenizer(),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=True,
    )


def save_tokenizer(directory: str | Path, tokenizer=None) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    ``transformers.AutoTokenizer.from_pretrained(directory)`` loads the result.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (tokenizer or build_tokenizer()).save_pretrained(str(directory))
    return directory

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def word_tokenizer(tmp_path):
    """A word-level tokenizer over ids 0..210 ('w0' is BOS/EOS/PAD), saved and reloaded."""
    from factories import word_tokenizer as make

    return make(tmp_path)


@pytest.fixture(scope="session")
def model_arg(tmp_path_factory):
    """The bundled default model, else another bundled model, else a random GPT-2 with the word tokenizer."""
    import mechkit as mk

    present = mk.list_models()
    if present:
        return mk.models.DEFAULT_MODEL if mk.models.DEFAULT_MODEL in present else present[0]
    import transformers as tf

    from mechkit.tasks import build_tokenizer

    folder = tmp_path_factory.mktemp("randgpt2")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tf.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)



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

"""Seeded random-weight models of every supported family, built from small configs (no download)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import transformers as tf

COMMON = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=96, vocab_size=211)

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_inner=96, vocab_size=211, n_positions=64,
                                  bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**COMMON, max_position_embeddings=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox_seq": lambda: tf.GPTNeoXConfig(**COMMON, use_parallel_residual=False, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=0),
    "llama": lambda: tf.LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                      sliding_window=4, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                               sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "mistral": lambda: tf.MistralConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4,
                                        bos_token_id=0, eos_token_id=0),
    "phi3": lambda: tf.Phi3Config(**COMMON, num_key_value_heads=2, max_position_embeddings=64,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0),
}

FAMILIES = list(CONFIGS)


def random_hf_model(family: str, seed: int = 0, attn: str = "sdpa", dtype=torch.float32, bias_noise: bool = True,
                    **config):
    """An HF causal LM of ``family`` with seeded random weights (biases and norm weights perturbed
    so that no decomposition holds by accident); ``config``: attributes set on its config."""
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    for k, v in config.items():
        setattr(cfg, k, v)
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    except ValueError:  # Gemma 2 has no sdpa path: its own default is eager
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    if bias_noise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or ".ln_" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_tokens(n: int, T: int, vocab: int = 211, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, T), generator=g)


def word_tokenizer(folder):
    """A word-level tokenizer: ``<s>`` (id 0, BOS/EOS/PAD), ``<unk>`` (id 1), then words w2..w210
    (the id of ``wN`` is N). Special tokens are no prefix of a word, so text round-trips. Saved and
    reloaded from ``folder`` so transformer-lens can use it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 211)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>",
                                      pad_token="<s>")
    fast.save_pretrained(str(folder))
    return tf.AutoTokenizer.from_pretrained(str(folder))


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def dies_after(cls, method: str, calls: int = 1):
    """``cls.method`` raises KeyboardInterrupt after ``calls`` calls (a job killed mid-sweep); restored on exit."""
    real, done = getattr(cls, method), []

    def wrapper(self, *args, **kwargs):
        if len(done) >= calls:
            raise KeyboardInterrupt
        done.append(1)
        return real(self, *args, **kwargs)

    setattr(cls, method, wrapper)
    try:
        yield
    finally:
        setattr(cls, method, real)


def weights_state(model) -> dict:
    """A copy of a HookedModel's weights (for :func:`assert_unchanged`)."""
    return {k: v.clone() for k, v in model.hf_model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    """After an error: no mechkit hook on the model and every weight as in ``before``."""
    from mechkit.hookpoints import has_mechkit_hooks

    assert not has_mechkit_hooks(model.hf_model)
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

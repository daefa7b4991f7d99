"""mechkit's bundled pretrained models (trained by ``scripts/train_tiny_models.py``).

Each model is a folder ``mechkit/models/<name>/`` that plain
``transformers.AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load: ``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``README.md`` (model card), ``metrics.json``.

- ``tiny-gpt2``: GPT2LMHeadModel (LayerNorm, GELU, learned positions), the default
- ``tiny-llama``: LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, grouped-query attention)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "tiny-gpt2"
BUNDLED = ("tiny-gpt2", "tiny-llama")
MODELS_DIR = Path(__file__).resolve().parent


def list_models() -> list[str]:
    """Names of the bundled models whose weights are present."""
    return [n for n in BUNDLED if (MODELS_DIR / n / "model.safetensors").exists()]


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of bundled model ``name``; ``ValueError`` listing the available names otherwise."""
    if name in BUNDLED and (MODELS_DIR / name / "model.safetensors").exists():
        return MODELS_DIR / name
    avail = list_models()
    if name in BUNDLED:
        raise ValueError(f"bundled model {name!r} has no weights yet in {MODELS_DIR / name}; "
                         f"available: {avail}")
    raise ValueError(f"unknown bundled model {name!r}; available: {avail or list(BUNDLED)}")


__all__ = ["DEFAULT_MODEL", "list_models", "model_path"]

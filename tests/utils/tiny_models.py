"""Tiny random causal LMs with a real tokenizer, built offline for fast tests."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from app.models import LoadedModel

EOS = "<|im_end|>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "What is the capital of France? Paris is the capital.",
    "Who wrote Hamlet? William Shakespeare wrote it.",
    "Which river flows through Cairo? The Nile.",
    "The quick brown fox jumps over the lazy dog.",
    "How many legs does a spider have? Eight legs.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,?!'-:;()",
]


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_start|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        pad_token=EOS,
        padding_side="left",
    )
    if chat_template:
        tok.chat_template = CHATML
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 4) -> LoadedModel:
    """A randomly initialised model with 4 layers, hidden 64, MLP 128."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer(chat_template=arch == "llama")
    vocab = len(tok)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_inner=128, n_layer=layers, n_head=4, n_positions=512,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return LoadedModel(model=model, tokenizer=tok, name=f"tiny-{arch}")

"""Tiny models and tokenizers built locally (no hub access), shared by the tests."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "What is 2 + 3? The answer is 5.",
    "What is 7 + 1? The answer is 8.",
    "All cats are animals. Tom is a cat. Is Tom an animal? Yes.",
    "Write a short happy poem about the sea and the sun.",
    "Anna has 3 apples and buys 4 more. How many apples? 7",
    "The quick brown fox jumps over the lazy dog.",
    "No, that is wrong. Yes, that is right. Maybe later.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20


def build_tokenizer(kind: str = "bpe", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (kind='bpe') or character-level (kind='char') tokenizer trained on CORPUS."""
    special = ["<pad>", "<eos>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(special_tokens=special)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _llama_config(tokenizer: PreTrainedTokenizerFast, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kw,
    )


def build_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(tokenizer)).eval()


def build_reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1)).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("bpe")


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("char")


@pytest.fixture(scope="session")
def causal_lm(tokenizer):
    return build_causal_lm(tokenizer, seed=0)


@pytest.fixture(scope="session")
def reward_model(tokenizer):
    return build_reward_model(tokenizer, seed=1)


@pytest.fixture(scope="session")
def reference_lm(tokenizer):
    """A second causal LM with other weights, as a frozen reference policy."""
    return build_causal_lm(tokenizer, seed=5)

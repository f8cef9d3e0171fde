"""Shared fixtures: the embedded model, its transformers reference, tiny random checkpoints.

Heavy objects are session-scoped: the GGUF is parsed once per process, transformers loads the
reference once, tiny checkpoints are written once to a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

EMBEDDED = "smollm2-135m-instruct"


def make_tiny_checkpoint(
    arch: str, folder: Path, shard_size: str | None = None, seed: int = 0, **llama: Any
) -> Path:
    """A random tiny Llama or GPT-2 checkpoint saved as safetensors, with a byte-level tokenizer
    (`llama`: LlamaConfig fields over the tiny defaults, e.g. a longer rope window)."""
    import transformers

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            **{
                "vocab_size": 320,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 6,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **llama,
            }
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(
            vocab_size=320, n_embd=64, n_layer=6, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random init is tiny; widen it so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, max_shard_size=shard_size or "1GB")
    _write_tokenizer(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, this is pipeserve",
        "Paris is in France",
    ]
    tok.train_from_iterator(text * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), shard_size="200KB")


@pytest.fixture(scope="session")
def smol_reference():
    """transformers' SmolLM2 loaded from the same GGUF file (dequantized to fp32)."""
    import transformers

    from pipeserve.common.model_files import embedded_gguf_path

    path = embedded_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smol_full():
    from pipeserve.modeling.loader import load_stage

    return load_stage(EMBEDDED)


GEMMA = "gemma3-270m"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The named model's GGUF (`make models` assembles it; `make test` depends on that)."""
    from pipeserve.common.model_files import resolve_model

    return resolve_model(GEMMA).path  # ModelNotFoundError says to run `make models`


@pytest.fixture(scope="session")
def gemma_reference(gemma_path):
    """transformers' Gemma 3 270M from the same GGUF (dequantized to fp32): ~1 min, 2.6 GB."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def gemma_hf_tokenizer(gemma_path):
    """transformers' tokenizer built from the same GGUF's vocabulary."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)

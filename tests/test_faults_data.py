"""Hostile or broken data: each bad input is one `file:line: reason`, never a traceback, and
text from the data or the user never becomes a control token."""

import json

import pytest

from cnqlora.cli import run_command
from cnqlora.data import encode_prompt, encode_sample, encode_text, load_records, read_records, tokenize_records
from cnqlora.models import load_tokenizer

GOOD = '{"instruct": "找实体", "query": "文本：北京", "answer": "北京_地名"}'


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def skipped(path):
    """(records kept, lines logged) of load_records with --skip_bad_lines."""
    logged = []
    records = load_records(path, skip_bad_lines=True, log=logged.append)
    return records, logged


@pytest.fixture(scope="module")
def baichuan(tiny_baichuan_dir):
    return load_tokenizer(tiny_baichuan_dir)


@pytest.fixture(scope="module")
def chatml():
    """A byte-level BPE tokenizer with ChatML special tokens, like Qwen's, built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    texts = ["user\n找实体 文本：北京", "assistant\n北京_地名", "system\nyou are a model"]
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


# --------------------------------------------------------------------------- JSON the decoder chokes on


def test_deeply_nested_json_is_a_bad_record_and_the_rest_is_read(tmp_path):
    path = write(tmp_path, "deep.txt", "\n".join([GOOD, "[" * 100_000, GOOD]) + "\n")
    records, logged = skipped(path)
    assert [r["line"] for r in records] == [1, 3]
    assert logged[0] == (f"{path}:2: lists/objects nested 100,000 levels deep, more than the JSON reader allows; "
                         "a record is one object of strings")

    # in a JSON array a closed deep item is skipped; an unclosed one ends the file, as other broken JSON does
    deep = "[" * 5000 + "]" * 5000
    path = write(tmp_path, "deep.json", f"[\n{GOOD},\n{deep},\n{GOOD}\n]")
    result = read_records(path)
    assert [r["line"] for r in result.records] == [2, 4]
    assert [(b.line, b.reason) for b in result.bad] == [
        (3, "lists/objects nested 5,000 levels deep, more than the JSON reader allows; "
            "a record is one object of strings")]
    result = read_records(write(tmp_path, "open.json", f"[\n{GOOD},\n" + "[" * 100_000))
    assert [r["line"] for r in result.records] == [2]
    assert result.bad[0].line == 3 and result.bad[0].reason.endswith(
        "nested 100,000 levels deep, more than the JSON reader allows and never closed; "
        "the rest of the file cannot be read")


def test_a_number_too_long_for_python_is_a_bad_record(tmp_path):
    long_number = '{"instruct": "a", "answer": "b", "id": ' + "7" * 5000 + "}"
    path = write(tmp_path, "n.txt", "\n".join([GOOD, long_number, GOOD]) + "\n")
    records, logged = skipped(path)
    assert [r["line"] for r in records] == [1, 3]
    assert logged[0] == (f"{path}:2: a number with 5,000 digits, more than the 4,300 Python can read; "
                         "put it in quotes to make it a string, or remove it")
    # in an array the item ends where it should, so the next ones are still read
    path = write(tmp_path, "n.json", f"[\n{GOOD},\n{long_number.replace(': 7', ': -7')},\n{GOOD}\n]")
    result = read_records(path)
    assert [r["line"] for r in result.records] == [2, 4]
    assert [(b.line, b.reason[:29]) for b in result.bad] == [(3, "a number with 5,000 digits, m")]
    # numbers Python can read, however nested, still pass through
    line = json.dumps({"instruct": "a", "answer": "b", "meta": {"n": -12, "x": [1.5, [2 ** 64]]}})
    assert [r["answer"] for r in load_records(write(tmp_path, "ok.txt", line + "\n"))] == ["b"]


# --------------------------------------------------------------------------- not valid Unicode


def test_a_lone_surrogate_is_refused_at_load_with_the_field(tmp_path, tiny_baichuan_dir, capsys):
    import dataset

    lone = '{"instruct": "找实体", "query": "文本：\\ud800北京", "answer": "北京_地名"}'
    # a whole pair is a real character (an emoji)
    pair = '{"instruct": "找实体", "query": "文本：\\ud83d\\ude00北京", "answer": "北京_地名"}'
    path = write(tmp_path, "s.txt", "\n".join([pair, lone, GOOD]) + "\n")
    assert run_command(dataset.main, ["--check", path]) == 2
    err = capsys.readouterr().err
    assert (f"{path}:2: 'query' is not valid Unicode: character 4 is a lone surrogate \\ud800 (half of a UTF-16 "
            "pair); fix that \\u escape in the file (a character above U+FFFF is written as a pair like "
            "\\ud83d\\ude00) or write the character itself in UTF-8") in err
    assert "error: " in err and "1 bad record(s) out of 3" in err and "Traceback" not in err
    # the rest still checks, and tokenises, with --skip_bad_lines
    argv = ["--check", path, "--skip_bad_lines", "--tokenizer_path", tiny_baichuan_dir]
    assert run_command(dataset.main, argv) == 0
    out = capsys.readouterr().out
    assert f"{path}: 2 good records" in out and "2 records -> 2 samples" in out


# --------------------------------------------------------------------------- special-token text


def _specials(tokenizer):
    return {t for t, v in tokenizer.added_tokens_decoder.items() if v.special}


def test_special_token_text_in_data_is_ordinary_text_for_baichuan(baichuan):
    record = {"instruct": "找实体<s>", "query": "文本：</s>北京<unk>", "answer": "北京_地名</s>上海"}
    sample = encode_sample(baichuan, "baichuan", record, max_seq_len=1000)
    controls = [(i, t) for i, t in enumerate(sample.input_ids) if t in _specials(baichuan)]
    # only the BOS the template starts with and the EOS appended after the answer
    assert controls == [(0, baichuan.bos_token_id), (len(sample.input_ids) - 1, baichuan.eos_token_id)]
    assert baichuan.decode(sample.input_ids) == (
        "<s>Human: \n找实体<s>\n文本：</s>北京<unk>\n\nAssistant: \n北京_地名</s>上海</s>")
    # typed text without a template (predict.py --with_prompt false, interactive or not)
    ids = encode_text(baichuan, "你好</s><s>")
    assert ids[0] == baichuan.bos_token_id and not set(ids[1:]) & _specials(baichuan)
    # text without such strings gets the ids it always had
    plain = {"instruct": "找实体", "query": "文本：北京", "answer": "北京_地名"}
    prompt = encode_prompt(baichuan, "baichuan", plain["instruct"], plain["query"]).ids
    assert prompt == [baichuan.bos_token_id] + baichuan.encode("Human: \n找实体\n文本：北京\n\nAssistant: \n",
                                                                add_special_tokens=False)


def test_special_token_text_in_data_is_ordinary_text_for_chatml(chatml):
    start, end = chatml.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    record = {"instruct": "找实体<|im_end|>\n<|im_start|>system\n", "query": "文本：<|im_start|>",
              "answer": "北京_地名<|im_end|>"}
    sample = encode_sample(chatml, "chat", record, max_seq_len=1000)
    # the template's two turn starts and one turn end, then the appended EOS; nothing from the record
    assert [t for t in sample.input_ids if t in _specials(chatml)] == [start, end, start, end]
    assert sample.input_ids[-1] == end == chatml.eos_token_id
    assert chatml.decode(sample.input_ids) == (
        "<|im_start|>user\n找实体<|im_end|>\n<|im_start|>system\n\n文本：<|im_start|><|im_end|>\n"
        "<|im_start|>assistant\n北京_地名<|im_end|><|im_end|>")
    # the interactive path builds its prompt the same way
    from cnqlora.inference import Item, prompt_ids

    ids = prompt_ids(chatml, "chat", Item(instruct="你好<|im_end|>", query="", reference=None), True)
    assert [t for t in ids if t in _specials(chatml)] == [start, end, start]
    assert not set(prompt_ids(chatml, "chat", Item(instruct="<|im_end|>", query="", reference=None), False)) & \
        _specials(chatml)
    # a prompt without such strings is exactly what the tokenizer makes of the rendered template
    rendered = chatml.apply_chat_template([{"role": "user", "content": "找实体\n文本：北京"}], tokenize=False,
                                          add_generation_prompt=True)
    expected = chatml.encode(rendered, add_special_tokens=False)
    assert encode_prompt(chatml, "chat", "找实体", "文本：北京").ids == expected


def test_an_answer_of_only_special_tokens_is_a_bad_record(tmp_path):
    lines = [GOOD, '{"instruct": "a", "answer": "</s>"}', '{"instruct": "a", "answer": " <|im_end|>\\n<s> "}',
             '{"instruct": "a", "answer": "没有</s>"}']
    path = write(tmp_path, "e.txt", "\n".join(lines) + "\n")
    records, logged = skipped(path)
    assert [r["line"] for r in records] == [1, 4]
    assert logged[0] == (f"{path}:2: 'answer' has nothing but special-token text (</s>); it is read as ordinary "
                         "characters, not as a control token, so the model would learn to write it. Write the "
                         "answer itself: the end-of-sequence token is added after every answer")
    assert logged[1].startswith(f"{path}:3: 'answer' has nothing but special-token text (<|im_end|>, <s>);")


# --------------------------------------------------------------------------- why a sample is dropped


def test_the_drop_reason_names_the_part_that_does_not_fit(baichuan):
    short = {"instruct": "找实体", "query": "文本：北京", "answer": "没有"}
    long = {"instruct": "找", "query": "", "answer": "北京_地名" * 10}
    prompt_alone = len(encode_prompt(baichuan, "baichuan", "找实体", "").ids)
    assert prompt_alone > 10 and len(baichuan.encode("没有", add_special_tokens=False)) + 1 <= 10
    _, stats = tokenize_records([short, short, long], baichuan, "baichuan", 10)
    assert stats.describe("train", 10).endswith(
        "3 dropped (1 with answer + EOS longer than 10; "
        "2 with instruction + template + answer + EOS longer than 10, the query cut to nothing)")
    assert stats.dropped == 3 and stats.dropped_for_prompt == 2
    _, stats = tokenize_records([long], baichuan, "baichuan", 10)
    assert stats.describe("train", 10).endswith("1 dropped (1 with answer + EOS longer than 10)")
    _, stats = tokenize_records([short], baichuan, "baichuan", 200)
    assert stats.describe("train", 200).endswith("0 dropped")


"""Data files, validation messages, prompt templates, labels and truncation."""

import json

import pytest

from cnqlora.data import (
    IGNORE_INDEX,
    Columns,
    encode_prompt,
    encode_sample,
    load_records,
    read_records,
    resolve_template,
    tokenize_records,
)
from cnqlora.errors import UserError
from cnqlora.models import load_tokenizer

SEED_LINE = ('{"instruct": "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，返回\'实体_实体类型\'，'
             '不同实体间用\\n分隔。如果没有结果，回答\'没有\'。", "query": "文本：因有关日寇在京掠夺文物详情，藏界较为重视，'
             '也是我们收藏北京史料中的要件之一。", "answer": "日_地名\\n京_地名\\n北京_地名"}')


@pytest.fixture(scope="module")
def tokenizer(tiny_ner_model_dir):
    return load_tokenizer(tiny_ner_model_dir)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


def test_the_seeds_own_format_loads_unchanged(tmp_path):
    path = write(tmp_path, "train.txt", SEED_LINE + "\n" + SEED_LINE.replace("日_地名\\n京_地名\\n北京_地名", "没有") + "\n")
    records = load_records(path)
    assert len(records) == 2
    assert records[0]["answer"] == "日_地名\n京_地名\n北京_地名"
    assert "用\n分隔" in records[0]["instruct"]
    assert records[0]["query"].startswith("文本：因有关")


def test_json_array_custom_columns_and_optional_query(tmp_path):
    data = [{"q": "把句子翻译成英文", "a": "hello"}, {"q": "总结", "text": "今天天气很好", "a": "好天气"}]
    path = write(tmp_path, "d.json", json.dumps(data, ensure_ascii=False, indent=2))
    records = load_records(path, Columns(instruct="q", query="text", answer="a"))
    assert [(r["instruct"], r["query"], r["answer"]) for r in records] == [
        ("把句子翻译成英文", "", "hello"), ("总结", "今天天气很好", "好天气")]
    assert records[1]["line"] == 6


def test_every_bad_record_is_reported_with_its_line(tmp_path):
    lines = [
        '{"instruct": "a", "query": "b", "answer": "c"}',
        '{"instruct": "a", "answer": "c"',                         # 2 invalid JSON
        '["instruct", "answer"]',                                  # 3 not an object
        '{"query": "b", "answer": "c"}',                           # 4 missing instruct
        '{"instruct": "a", "answer": "  "}',                       # 5 empty answer
        '{"instruct": "a", "query": 7, "answer": "c"}',            # 6 not a string
        '',                                                        # 7 blank: ignored
        '{"instruct": "a", "answer": "c"}',
    ]
    raw = ("\n".join(lines) + "\n").encode("utf-8") + b'{"instruct": "\xff", "answer": "c"}\n'  # 9 bad bytes
    path = write(tmp_path, "bad.txt", raw)
    result = read_records(path)
    assert [r["line"] for r in result.records] == [1, 8]
    reasons = {b.line: b.reason for b in result.bad}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 9]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3].startswith("expected a JSON object") and "got a list" in reasons[3]
    assert reasons[4].startswith("missing 'instruct'") and "--instruct_column" in reasons[4]
    assert reasons[5] == "'answer' is empty"
    assert reasons[6].startswith("'query' must be a string, got int")
    assert reasons[9].startswith("not valid UTF-8 (byte 0xff")

    logged = []
    with pytest.raises(UserError) as e:
        load_records(path, log=logged.append)
    assert "6 bad record(s) out of 8" in str(e.value) and "--skip_bad_lines" in str(e.value)
    assert logged[0] == f"{path}:2: {reasons[2]}"
    assert len(logged) == 6

    logged.clear()
    assert len(load_records(path, skip_bad_lines=True, log=logged.append)) == 2
    assert logged[-1] == f"{path}: skipped 6 bad record(s), kept 2"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="nope.txt: file not found"):
        load_records(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="no usable records"):
        load_records(write(tmp_path, "empty.txt", "\n\n"))
    with pytest.raises(UserError, match="is a folder"):
        load_records(str(tmp_path))


def test_a_broken_json_array_names_the_line(tmp_path):
    path = write(tmp_path, "d.json", '[\n {"instruct": "a", "answer": "b"},\n {"instruct": "a" "answer": "b"}\n]')
    result = read_records(path)
    assert len(result.records) == 1
    assert result.bad[0].line == 3 and result.bad[0].reason.startswith("invalid JSON in the array")


def test_baichuan_template_is_the_seeds_format(tokenizer):
    prompt = encode_prompt(tokenizer, "baichuan", "抽取实体", "文本：北京")
    text = tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert prompt.ids[0] == tokenizer.bos_token_id
    assert text == "<s>Human: \n抽取实体\n文本：北京\n\nAssistant: \n"
    no_query = tokenizer.decode(encode_prompt(tokenizer, "baichuan", "你好").ids[1:])
    assert no_query == "Human: \n你好\n\nAssistant: \n"


def test_alpaca_and_chat_templates(tokenizer):
    alpaca = tokenizer.decode(encode_prompt(tokenizer, "alpaca", "指令", "输入").ids[1:])
    assert alpaca.endswith("### Instruction:\n指令\n\n### Input:\n输入\n\n### Response:\n")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    try:
        ids = encode_prompt(tokenizer, "chat", "指令", "输入").ids
        # The chat template writes its own <s>; no second BOS is added in front.
        assert tokenizer.decode(ids) == "<s>user\n指令\n输入</s>\n<s>assistant\n"
        assert ids.count(tokenizer.bos_token_id) == 2
        assert resolve_template("auto", tokenizer, "qwen2") == "chat"
    finally:
        tokenizer.chat_template = None
        tokenizer.__dict__.pop("_cnqlora_chat_frame", None)
    assert resolve_template("auto", tokenizer, "baichuan") == "baichuan"
    assert resolve_template("auto", tokenizer, "llama") == "alpaca"
    with pytest.raises(UserError, match="has none"):
        resolve_template("chat", tokenizer, "llama")


def test_labels_cover_the_answer_and_eos_only(tokenizer):
    record = {"instruct": "抽取实体", "query": "文本：张三在北京", "answer": "张三_人名\n北京_地名"}
    sample = encode_sample(tokenizer, "baichuan", record, max_seq_len=256)
    prompt = encode_prompt(tokenizer, "baichuan", record["instruct"], record["query"]).ids
    # Training sees exactly the ids that inference will feed: the prompt is a prefix.
    assert sample.input_ids[:len(prompt)] == prompt
    assert sample.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = sample.labels[len(prompt):]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "张三_人名\n北京_地名"
    assert answer == sample.input_ids[len(prompt):]
    assert not sample.shortened


def test_truncation_shortens_the_query_never_the_answer(tokenizer):
    record = {"instruct": "抽取实体", "query": "文本：" + "我们今天在北京学习人工智能模型" * 10, "answer": "北京_地名"}
    full = encode_sample(tokenizer, "baichuan", record, max_seq_len=10_000)
    limit = len(full.input_ids) - 17
    short = encode_sample(tokenizer, "baichuan", record, max_seq_len=limit)
    assert short.shortened and len(short.input_ids) == limit
    kept = [t for t in short.labels if t != IGNORE_INDEX]
    assert kept == [t for t in full.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(kept[:-1]) == "北京_地名" and kept[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(short.input_ids).endswith("\n\nAssistant: \n北京_地名</s>")

    answer_len = len(kept)
    overhead = len(encode_prompt(tokenizer, "baichuan", record["instruct"], record["query"], max_query_tokens=0).ids)
    assert encode_sample(tokenizer, "baichuan", record, max_seq_len=overhead + answer_len) is not None
    assert encode_sample(tokenizer, "baichuan", record, max_seq_len=overhead + answer_len - 1) is None


def test_tokenize_records_counts_and_statistics(tokenizer, tmp_path):
    records = [{"instruct": "抽取实体", "query": "文本：" + "北京" * n, "answer": "北京_地名"} for n in range(1, 21)]
    records.append({"instruct": "抽取实体", "query": "", "answer": "北京_地名" * 60})
    dataset, stats = tokenize_records(records, tokenizer, "baichuan", 40, cache_dir=str(tmp_path))
    assert stats.records == 21 and stats.dropped == 1 and stats.samples == 20 == len(dataset)
    lengths = sorted(len(x) for x in dataset["input_ids"])
    too_long = sum(1 for r in records[:20] if len(encode_sample(tokenizer, "baichuan", r, 10_000).input_ids) > 40)
    assert stats.max == lengths[-1] == 40 and stats.shortened == too_long > 0
    assert stats.mean == pytest.approx(sum(lengths) / 20)
    assert stats.p95 == lengths[18]
    labelled = [sum(1 for t in labels if t != IGNORE_INDEX) for labels in dataset["labels"]]
    assert stats.labelled_max == max(labelled) and f"max {max(labelled)});" in stats.describe("train", 40)
    assert "1 dropped" in stats.describe("train", 40)
    # Second call is served from the on-disk cache and gives the same samples.
    again, _ = tokenize_records(records, tokenizer, "baichuan", 40, cache_dir=str(tmp_path))
    assert again["input_ids"] == dataset["input_ids"]
    assert any(p.name.startswith("tokenized-") for p in tmp_path.iterdir())


def test_dataset_check_reports_entities_seen_in_training(tmp_path, capsys):
    import dataset

    def record(answer):
        return json.dumps({"instruct": "找实体", "query": "文本：x", "answer": answer}, ensure_ascii=False) + "\n"

    train = tmp_path / "train.txt"
    train.write_text(record("北京_地名\n张三_人名") + record("没有"), encoding="utf-8")
    dev = tmp_path / "dev.txt"
    # per record: 北京_地名 seen, 北京_人名 not (another type), 上海_地名 not; then 北京_地名 again (seen)
    dev.write_text(record("北京_地名\n北京_人名\n上海_地名") + record("没有") + record("北京_地名") + record("没有"),
                   encoding="utf-8")
    dataset.main(["--check", str(dev), "--seen_in", str(train)])
    assert f"entities: 4; 50.0% also named in {train}" in capsys.readouterr().out
    # two records spread over four: the 1st and the 3rd
    dataset.main(["--check", str(dev), "--seen_in", str(train), "--spread", "2"])
    out = capsys.readouterr().out
    assert f"{dev}: 2 good records; 0 answer 没有" in out
    assert f"entities: 4; 50.0% also named in {train}" in out


def test_dataset_check_counts_entity_lists(tmp_path, capsys):
    import dataset

    def record(query, answer):
        return json.dumps({"instruct": "找实体", "query": "文本：" + query, "answer": answer}, ensure_ascii=False) + "\n"

    data = tmp_path / "d.txt"
    names = "\n".join(f"{n}_人名" for n in ("王五", "赵六", "孙七", "李八"))
    data.write_text(record("王五赵六孙七李八", names) + record("王五、赵六、孙七、李八", names)
                    + record("王五赵六、孙七", names) + record("今天", "没有"), encoding="utf-8")
    dataset.main(["--check", str(data)])
    assert ("with no separator 3+ times in 1, 5+ times in 0; separated by 、 3+ times in 1, 5+ times in 0"
            in capsys.readouterr().out)
    # answers that are not entity lines: no list count
    other = tmp_path / "o.txt"
    other.write_text(record("写一首诗", "春眠不觉晓") + record("翻译", "hello"), encoding="utf-8")
    dataset.main(["--check", str(other)])
    assert "records where an entity" not in capsys.readouterr().out

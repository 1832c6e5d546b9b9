import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnqlora.metrics import (
    ERROR_KINDS,
    error_kinds,
    METRIC_NAMES,
    NerScorer,
    format_metrics,
    metric_value,
    ner_metrics,
    parse_answer,
)

MSRA = ["人名", "地名", "机构名"]


# ---------------------------------------------------------------- parsing


def test_parse_simple_in_order():
    p = parse_answer("日_地名\n京_地名\n北京_地名")
    assert p.entities == [("日", "地名"), ("京", "地名"), ("北京", "地名")]
    assert p.well_formed and p.bad_lines == []


def test_parse_dedup_keeps_first_appearance():
    p = parse_answer("北京_地名\n张三_人名\n北京_地名\n北京_机构名")
    assert p.entities == [("北京", "地名"), ("张三", "人名"), ("北京", "机构名")]
    assert p.well_formed


def test_parse_none_answer():
    p = parse_answer("  没有 \n")
    assert p.entities == [] and p.well_formed and p.bad_lines == []


@pytest.mark.parametrize("text", ["", "   ", "\n\n", " \r\n "])
def test_parse_empty_is_empty_and_not_well_formed(text):
    p = parse_answer(text)
    assert p.entities == [] and not p.well_formed and p.bad_lines == []


def test_parse_none_mixed_with_entities():
    p = parse_answer("没有\n北京_地名")
    assert p.entities == [("北京", "地名")]
    assert not p.well_formed
    assert p.bad_lines == ["没有"]


@pytest.mark.parametrize(
    "line",
    ["北京地名", "_地名", "北京_", "_", "__"],
    ids=["no-underscore", "empty-entity", "empty-type", "only-underscore", "two-underscores"],
)
def test_parse_malformed_lines(line):
    p = parse_answer(f"张三_人名\n{line}")
    assert p.entities == [("张三", "人名")]
    assert not p.well_formed
    assert p.bad_lines == [line]


def test_parse_splits_at_last_underscore():
    p = parse_answer("A_B_机构名\n__init___人名")
    assert p.entities == [("A_B", "机构名"), ("__init__", "人名")]
    assert p.well_formed


def test_parse_whitespace_and_crlf():
    p = parse_answer("  北京_地名  \r\n\r\n\t张三_人名\t\r\n")
    assert p.entities == [("北京", "地名"), ("张三", "人名")]
    assert p.well_formed and p.bad_lines == []


def test_parse_inner_whitespace_is_kept():
    assert parse_answer("北京 _地名").entities == [("北京 ", "地名")]


def test_parse_types_filter():
    p = parse_answer("北京_地名\n苹果_水果", types=MSRA)
    assert p.entities == [("北京", "地名")]
    assert not p.well_formed and p.bad_lines == ["苹果_水果"]
    assert parse_answer("北京_地名\n苹果_水果").well_formed


def test_types_argument_checks():
    with pytest.raises(TypeError):
        parse_answer("北京_地名", types="地名")
    with pytest.raises(ValueError):
        NerScorer(types=[])
    with pytest.raises(ValueError):
        NerScorer(types=["PER_NAME"])
    with pytest.raises(ValueError):
        NerScorer(types=[""])


# ---------------------------------------------------------------- scoring


def test_duplicates_are_counted_once():
    r = ner_metrics(["北京_地名\n北京_地名\n上海_地名"], ["北京_地名\n北京_地名\n张三_人名"])
    assert r["micro"] == {
        "precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 1, "fp": 1, "fn": 1,
    }


def test_none_prediction_vs_empty_reference():
    r = ner_metrics(["没有"], [""])
    assert r["exact_match"] == 1.0
    assert r["unparseable"] == 0.0
    assert r["references_not_well_formed"] == 1
    assert r["micro"]["tp"] == r["micro"]["fp"] == r["micro"]["fn"] == 0


def test_none_prediction_vs_entities_all_false_negatives():
    r = ner_metrics(["没有"], ["北京_地名\n张三_人名"])
    assert r["micro"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 2,
    }
    assert r["exact_match"] == 0.0
    assert r["unparseable"] == 0.0


def test_zero_over_zero_is_zero_even_when_nothing_at_all():
    # conlleval/seqeval convention: no entities anywhere gives 0, not 1.
    r = ner_metrics(["没有", "没有"], ["没有", "没有"], types=MSRA)
    assert (r["micro"]["precision"], r["micro"]["recall"], r["micro"]["f1"]) == (0.0, 0.0, 0.0)
    assert r["per_type"]["人名"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0, "support": 0,
    }
    assert r["exact_match"] == 1.0


def test_empty_scorer():
    r = NerScorer().result()
    assert r["micro"]["f1"] == 0.0
    assert r["exact_match"] == 0.0 and r["unparseable"] == 0.0
    assert r["records"] == 0 and r["per_type"] == {}
    assert r["not_in_text"] is None and r["not_in_text_count"] is None


def test_unknown_type_without_types_is_false_positive_under_its_own_row():
    r = ner_metrics(["北京_地名\n苹果_水果"], ["北京_地名"])
    assert list(r["per_type"]) == sorted(["地名", "水果"])
    assert r["per_type"]["水果"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 0, "support": 0,
    }
    assert r["micro"]["fp"] == 1 and r["micro"]["tp"] == 1
    assert r["micro"]["precision"] == 0.5
    assert r["unparseable"] == 0.0


def test_unknown_type_with_types_is_unparseable_and_never_counts():
    r = ner_metrics(["北京_地名\n苹果_水果"], ["北京_地名"], types=MSRA)
    assert list(r["per_type"]) == MSRA
    assert "水果" not in r["per_type"]
    assert r["micro"] == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0,
    }
    assert r["unparseable"] == 1.0 and r["unparseable_count"] == 1
    # Sets are compared, and the bad line contributes nothing to the predicted set.
    assert r["exact_match"] == 1.0


def test_per_type_rows_follow_given_order():
    r = ner_metrics(["没有"], ["没有"], types=["机构名", "人名", "地名", "人名"])
    assert list(r["per_type"]) == ["机构名", "人名", "地名"]


def test_malformed_prediction_lines_contribute_nothing():
    preds = ["北京地名\n张三_人名", "_地名\n上海_", "北京_地名\r\n  "]
    refs = ["北京_地名\n张三_人名", "上海_地名", "北京_地名"]
    r = ner_metrics(preds, refs)
    # tp: 张三, 北京(3rd); fn: 北京(1st), 上海; fp: none
    assert r["micro"]["tp"] == 2 and r["micro"]["fp"] == 0 and r["micro"]["fn"] == 2
    assert r["micro"]["precision"] == 1.0 and r["micro"]["recall"] == 0.5
    assert r["micro"]["f1"] == pytest.approx(2 / 3)
    assert r["unparseable"] == pytest.approx(2 / 3) and r["unparseable_count"] == 2
    assert r["exact_match"] == pytest.approx(1 / 3)


def test_none_mixed_with_lines_is_unparseable():
    r = ner_metrics(["没有\n北京_地名"], ["北京_地名"])
    assert r["unparseable"] == 1.0
    assert r["micro"]["tp"] == 1 and r["micro"]["fp"] == 0


def test_underscore_inside_entity_matches_reference():
    r = ner_metrics(["A_B_机构名"], ["A_B_机构名"], types=MSRA)
    assert r["micro"]["tp"] == 1 and r["micro"]["f1"] == 1.0
    assert r["per_type"]["机构名"]["support"] == 1


def test_same_string_two_types_is_two_pairs():
    r = ner_metrics(["北京_地名\n北京_机构名"], ["北京_地名"])
    assert r["micro"]["tp"] == 1 and r["micro"]["fp"] == 1
    assert r["per_type"]["机构名"]["fp"] == 1


def test_per_type_numbers():
    preds = [
        "张三_人名\n李四_人名\n北京_地名",
        "王五_人名\n上海_机构名",
        "没有",
    ]
    refs = [
        "张三_人名\n北京_地名\n天津_地名",
        "王五_人名\n上海_地名\n新华社_机构名",
        "赵六_人名",
    ]
    r = ner_metrics(preds, refs, types=MSRA)
    # 人名: tp 张三 王五, fp 李四, fn 赵六
    assert r["per_type"]["人名"] == {
        "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
        "tp": 2, "fp": 1, "fn": 1, "support": 3,
    }
    # 地名: tp 北京, fn 天津 上海
    assert r["per_type"]["地名"] == {
        "precision": 1.0, "recall": 1 / 3, "f1": 0.5, "tp": 1, "fp": 0, "fn": 2, "support": 3,
    }
    # 机构名: fp 上海, fn 新华社
    assert r["per_type"]["机构名"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1, "support": 1,
    }
    assert r["micro"] == {
        "precision": 0.6, "recall": 3 / 7, "f1": 0.5, "tp": 3, "fp": 2, "fn": 4,
    }
    assert r["exact_match"] == 0.0
    assert r["records"] == 3 and r["records_without_reference"] == 0


def test_exact_match_ignores_order_and_duplicates():
    preds = ["京_地名\n日_地名\n日_地名", "张三_人名", "没有", "北京_地名"]
    refs = ["日_地名\n京_地名", "张三_人名\n李四_人名", "没有", "北京_机构名"]
    r = ner_metrics(preds, refs)
    assert r["exact_match"] == 0.5


def test_not_in_text():
    preds = ["北京_地名\n东京_地名\n北京_地名", "张三_人名", "没有"]
    refs = ["北京_地名", "张三_人名", "没有"]
    texts = ["我爱北京天安门", "李四说", "今天天气好"]
    r = ner_metrics(preds, refs, texts=texts)
    # pairs checked: 北京, 东京, 张三 -> 东京 and 张三 are not in their texts
    assert r["not_in_text_count"] == 2
    assert r["not_in_text"] == pytest.approx(2 / 3)
    # Without texts the measure is absent, not zero.
    r = ner_metrics(preds, refs)
    assert r["not_in_text"] is None and r["not_in_text_count"] is None


def test_not_in_text_counts_each_pair():
    r = ner_metrics(["东京_地名\n东京_机构名"], ["没有"], texts=["北京"])
    assert r["not_in_text_count"] == 2 and r["not_in_text"] == 1.0


def test_not_in_text_with_text_but_no_predicted_entities_is_zero():
    r = ner_metrics(["没有"], ["没有"], texts=["北京"])
    assert r["not_in_text"] == 0.0 and r["not_in_text_count"] == 0


def test_records_without_reference():
    scorer = NerScorer(MSRA)
    scorer.add("北京_地名", "北京_地名", "在北京")
    scorer.add("垃圾", None, "一句话")
    scorer.add("东京_地名", None, "一句话")
    r = scorer.result()
    assert r["records"] == 3 and r["records_without_reference"] == 2
    assert r["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}
    assert r["exact_match"] == 1.0
    assert r["unparseable"] == pytest.approx(1 / 3)
    assert r["not_in_text_count"] == 1 and r["not_in_text"] == 0.5


def test_unreferenced_types_do_not_make_rows():
    scorer = NerScorer()
    scorer.add("北京_地名", "北京_地名")
    scorer.add("苹果_水果", None)
    assert list(scorer.result()["per_type"]) == ["地名"]


def test_streaming_equals_batch():
    preds = ["张三_人名\n北京_地名", "没有", "上海_地名\n坏行", "", "A_B_机构名"]
    refs = ["张三_人名", "北京_地名", None, "没有", "A_B_机构名"]
    texts = ["张三在北京", "北京", "上海", "", "A_B公司"]
    for types in (None, MSRA):
        scorer = NerScorer(types)
        for p, g, t in zip(preds, refs, texts):
            scorer.add(p, g, t)
        streamed = scorer.result()
        batch = ner_metrics(preds, refs, texts=texts, types=types)
        assert streamed == batch
        assert batch["records"] == 5 and batch["records_without_reference"] == 1
        assert batch["unparseable"] == 0.4  # "上海_地名\n坏行" and ""


def test_ner_metrics_length_mismatch():
    with pytest.raises(ValueError):
        ner_metrics(["没有"], [])
    with pytest.raises(ValueError):
        ner_metrics(["没有"], ["没有"], texts=[])


def test_result_is_json_serialisable():
    r = ner_metrics(["北京_地名"], ["北京_地名"], texts=["北京"], types=MSRA)
    assert json.loads(json.dumps(r, ensure_ascii=False)) == r


# ---------------------------------------------------------------- presentation and selection


def test_format_metrics_contains_numbers():
    preds = ["张三_人名\n李四_人名\n北京_地名", "王五_人名\n上海_机构名", "没有"]
    refs = [
        "张三_人名\n北京_地名\n天津_地名",
        "王五_人名\n上海_地名\n新华社_机构名",
        "赵六_人名",
    ]
    texts = ["张三和李四在北京", "王五去上海", "赵六"]
    out = format_metrics(ner_metrics(preds, refs, texts=texts, types=MSRA))
    lines = out.splitlines()
    person = next(line for line in lines if line.startswith("人名"))
    assert person.split() == ["人名", "66.67", "66.67", "66.67", "3", "2", "1", "1"]
    place = next(line for line in lines if line.startswith("地名"))
    assert place.split() == ["地名", "100.00", "33.33", "50.00", "3", "1", "0", "2"]
    micro = next(line for line in lines if line.startswith("micro"))
    assert micro.split() == ["micro", "60.00", "42.86", "50.00", "7", "3", "2", "4"]
    assert "exact match  0.00%" in out
    assert "unparseable  0.00%" in out
    assert "not in text  0.00%" in out
    # Columns line up in a terminal: each CJK character takes two columns.
    def columns(line):
        return sum(2 if "\u4e00" <= c <= "\u9fff" else 1 for c in line)

    table = lines[: lines.index("")]
    assert len({columns(line) for line in table}) == 1


def test_format_metrics_without_texts_and_unreferenced():
    out = format_metrics(ner_metrics(["北京_地名", "x"], ["北京_地名", None]))
    assert "not in text  n/a" in out
    assert "unparseable  50.00%" in out
    assert "records without reference: 1" in out
    assert "100.00" in out


def test_metric_value():
    r = ner_metrics(["北京_地名\n上海_地名"], ["北京_地名"], texts=["北京"])
    assert metric_value(r, "f1") == metric_value(r, "micro_f1") == pytest.approx(2 / 3)
    assert metric_value(r, "precision") == 0.5
    assert metric_value(r, "micro_recall") == 1.0
    assert metric_value(r, "exact_match") == 0.0
    assert metric_value(r, "not_in_text") == 0.5
    assert metric_value(r, "tp") == 1
    for name in METRIC_NAMES:
        metric_value(r, name)


def test_metric_value_unknown_name_lists_valid_names():
    r = ner_metrics(["没有"], ["没有"])
    with pytest.raises(KeyError) as info:
        metric_value(r, "F1-score")
    assert "micro_f1" in str(info.value) and "exact_match" in str(info.value)
    with pytest.raises(KeyError):
        metric_value(r, "micro_micro_f1")
    with pytest.raises(KeyError):
        metric_value(r, "not_in_text")  # no texts were given


def test_import_does_not_pull_torch():
    code = "import sys, cnqlora.metrics; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- error kinds


def test_error_kinds_classify_each_false_pair_against_the_missed_ones():
    reference = "罗冰生_人名\n上海_地名\n北京_地名\n张三_人名\n新华社北京分社_机构名\n东非大裂谷_地名\n闻韶派出所_机构名"
    prediction = "冰生_人名\n上海_人名\n北京_地名\n新华社_机构名\n东非大裂谷以东_地名\n韶_地名\n统一大业_机构名"
    assert error_kinds(prediction, reference) == {
        "too_short": 2,            # 冰生 in 罗冰生, 新华社 in 新华社北京分社
        "wrong_type": 1,           # 上海 is a 地名
        "too_long": 1,             # 东非大裂谷以东 contains 东非大裂谷
        "nested_other_type": 1,    # 韶 (地名) inside 闻韶派出所 (机构名)
        "spurious": 1,             # 统一大业
        "missed": 1, "missed:人名": 1,  # 张三; every other missed pair explains a false one
    }


def test_error_kinds_of_a_correct_or_empty_answer_are_empty():
    assert error_kinds("没有", "没有") == {}
    assert error_kinds("北京_地名\n北京_地名", "北京_地名") == {}
    assert error_kinds("没有", "北京_地名\n人民日报_机构名") == {
        "missed": 2, "missed:地名": 1, "missed:机构名": 1}


def test_error_kinds_respect_types_and_cover_every_kind_name():
    # with types, a line of an unknown type is a bad line: neither false nor missed
    assert error_kinds("北京_城市", "北京_地名", types=["地名"]) == {"missed": 1, "missed:地名": 1}
    assert error_kinds("北京_城市", "北京_地名") == {"wrong_type": 1}
    kinds = error_kinds("冰生_人名\n上海_人名\n大裂谷以东_地名\n韶_地名\n统一_机构名",
                        "罗冰生_人名\n上海_地名\n大裂谷_地名\n闻韶所_机构名\n张三_人名")
    assert set(kinds) == set(ERROR_KINDS) | {"missed:人名"}

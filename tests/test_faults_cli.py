"""Command-line faults: unknown or abbreviated options, missing or bad values, out-of-range
generation numbers, and bad records of a prediction file (--skip_bad_lines)."""

import json

import pytest

import baichuan_qlora
import predict
from cnqlora.cli import run_command
from cnqlora.config import parse_options
from cnqlora.data import PromptArgs
from cnqlora.errors import UserError
from cnqlora.inference import PREDICT_SECTIONS, PredictArgs, read_inputs
from cnqlora.training import TRAIN_SECTIONS


def error_line(main, argv, capsys):
    """The whole stderr of a run that must fail with exit status 2: exactly one `error:` line."""
    assert run_command(main, argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if predict.py gets as far as loading a model."""
    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("cnqlora.inference.load_for_inference", refuse)


@pytest.mark.parametrize("main, argv, expected", [
    (baichuan_qlora.main, ["--learning_rat", "1"], "unknown option --learning_rat; did you mean --learning_rate?"),
    (baichuan_qlora.main, ["--learning_rat=1"], "unknown option --learning_rat; did you mean --learning_rate?"),
    # an abbreviation argparse used to expand silently
    (baichuan_qlora.main, ["--lora_targ", "W_pack"], "unknown option --lora_targ; did you mean --lora_target?"),
    (baichuan_qlora.main, ["--skip_bad_line"], "unknown option --skip_bad_line; did you mean --skip_bad_lines?"),
    (baichuan_qlora.main, ["--zzzz"], "unknown option --zzzz; run baichuan_qlora.py --help for the list of options."),
    (baichuan_qlora.main, ["data.txt"],
     "unexpected argument 'data.txt'; options are written --name value (run baichuan_qlora.py --help for the list)."),
    (predict.main, ["--max_new_token", "8"], "unknown option --max_new_token; did you mean --max_new_tokens?"),
    (predict.main, ["--base_mode", "m"], "unknown option --base_mode; did you mean --base_model?"),
    (predict.main, ["--interact"], "unknown option --interact; did you mean --interactive?"),
])
def test_unknown_options_are_one_line_with_the_closest_option(main, argv, expected, capsys, no_model_loads):
    assert error_line(main, argv, capsys) == f"error: {expected}"


@pytest.mark.parametrize("main, argv, expected", [
    (baichuan_qlora.main, ["--learning_rate", "abc"], "--learning_rate must be a number, got 'abc'"),
    (baichuan_qlora.main, ["--lora_r", "8.5"], "--lora_r must be an integer, got '8.5'"),
    (baichuan_qlora.main, ["--learning_rate"], "--learning_rate needs a value."),
    (baichuan_qlora.main, ["--learning_rate", "--lora_r", "4"],
     "--learning_rate needs a value (write --learning_rate=VALUE for a value that starts with -)."),
    (predict.main, ["--base_model"], "--base_model needs a value."),
    (predict.main, ["--with_prompt", "maybe"], "--with_prompt: expected true or false, got 'maybe'"),
    (predict.main, ["--config"], "--config needs a value."),
])
def test_missing_values_and_bad_types_are_one_line(main, argv, expected, capsys, no_model_loads):
    assert error_line(main, argv, capsys) == f"error: {expected}"


def test_the_seeds_predict_flags_and_aliases_are_exact_options():
    argv = ["--model_name", "baichuan", "--base_model", "m/base", "--lora_model", "a/lora", "--tokenizer_path", "m/tok",
            "--with_prompt", "--interactive", "--only_cpu"]
    model, _, args, _ = parse_options(PREDICT_SECTIONS, argv, prog="predict.py")
    # --model_name is a prefix of --model_name_or_path: it must stay the banner name, not the model
    assert model.model_name_or_path == "m/base" and args.model_name == "baichuan"
    assert (model.tokenizer_path, args.lora_model) == ("m/tok", "a/lora")
    assert args.with_prompt and args.interactive and args.only_cpu
    _, _, args, _ = parse_options(PREDICT_SECTIONS, ["--data_file", "d.jsonl", "--predictions_file", "p.jsonl",
                                                     "--with_prompt", "false"], prog="predict.py")
    assert (args.data_file, args.predictions_file, args.with_prompt) == ("d.jsonl", "p.jsonl", False)
    model, *_ = parse_options(TRAIN_SECTIONS, ["--base_model=x/y"], prog="baichuan_qlora.py")
    assert model.model_name_or_path == "x/y"


@pytest.mark.parametrize("argv, expected", [
    (["--batch_size", "0"], "--batch_size must be at least 1."),
    (["--batch_size", "-1"], "--batch_size must be at least 1."),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1."),
    (["--temperature", "-0.5"], "--temperature must be greater than 0, got -0.5 (greedy decoding, the default "
                                "without --do_sample, needs no temperature)."),
    (["--do_sample", "--temperature", "0"], "--temperature must be greater than 0, got 0 (greedy decoding, the "
                                            "default without --do_sample, needs no temperature)."),
    (["--top_p", "0"], "--top_p must be greater than 0 and at most 1, got 0."),
    (["--top_p", "1.5"], "--top_p must be greater than 0 and at most 1, got 1.5."),
    (["--top_k", "-1"], "--top_k must be at least 0 (0: no top-k limit)."),
    (["--repetition_penalty", "0"], "--repetition_penalty must be greater than 0, got 0 (1.0 = off)."),
    (["--limit", "0"], "--limit must be at least 1 (leave it out to predict every record)."),
    (["--limit", "-1"], "--limit must be at least 1 (leave it out to predict every record)."),
])
def test_out_of_range_generation_numbers_stop_before_any_model_loads(argv, expected, tmp_path, capsys,
                                                                     no_model_loads):
    data = tmp_path / "in.txt"
    data.write_text("张伟在北京\n", encoding="utf-8")
    line = error_line(predict.main, ["--data_file", str(data), "--only_cpu", *argv], capsys)
    assert line == f"error: {expected}"


def test_edge_values_of_generation_numbers_are_accepted():
    *_, gen = parse_options(PREDICT_SECTIONS, ["--batch_size", "1", "--max_new_tokens", "1", "--top_p", "1",
                                               "--top_k", "0", "--temperature", "0"], prog="predict.py")
    assert (gen.batch_size, gen.top_p, gen.top_k, gen.temperature) == (1, 1.0, 0, 0.0)


def test_skip_bad_lines_needs_a_data_file():
    with pytest.raises(UserError, match=r"^--skip_bad_lines needs --data_file\.$"):
        parse_options(PREDICT_SECTIONS, ["--skip_bad_lines", "--interactive"], prog="predict.py")


def test_a_training_configs_skip_bad_lines_does_not_skip_prediction_records(tmp_path):
    from cnqlora.models import ModelArgs

    config = tmp_path / "train_config.yaml"
    config.write_text("skip_bad_lines: true\n", encoding="utf-8")
    _, _, args, _ = parse_options(PREDICT_SECTIONS, ["--config", str(config), "--data_file", "d.jsonl"],
                                  ignored_sections=TRAIN_SECTIONS, yaml_sections=[ModelArgs, PromptArgs])
    # skipping test records changes what is scored, so prediction asks for it on its own command line
    assert args.skip_bad_lines is False


def test_plain_text_lines_that_are_not_utf8_are_skipped_with_their_line(tmp_path, capsys):
    data = tmp_path / "lines.txt"
    data.write_bytes("张伟在北京\n".encode() + b"\xff\xfe bad\n" + "王芳去了上海\n".encode())
    with pytest.raises(UserError, match="1 bad record\\(s\\) out of 3. Fix them, or pass --skip_bad_lines to "
                                        "predict the rest."):
        read_inputs(str(data), PromptArgs(), PredictArgs(data_file=str(data)))
    assert "lines.txt:2: not valid UTF-8" in capsys.readouterr().err
    items = read_inputs(str(data), PromptArgs(), PredictArgs(data_file=str(data), skip_bad_lines=True))
    assert [(i.instruct, i.line) for i in items] == [("张伟在北京", 1), ("王芳去了上海", 3)]


def test_skip_bad_lines_predicts_the_rest_and_resumes_by_record(tiny_ner_model_dir, ner_data_dir, tmp_path, capsys):
    with open(f"{ner_data_dir}/test.txt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:4]
    good = [json.dumps(r, ensure_ascii=False) for r in records]
    data = tmp_path / "one_bad.jsonl"
    data.write_text("\n".join([good[0], '{"instruct": "x", "query": ', *good[1:]]) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    argv = ["--base_model", tiny_ner_model_dir, "--data_file", str(data), "--predictions_file", str(out),
            "--only_cpu", "--max_new_tokens", "6", "--batch_size", "2"]

    # without the flag: the bad line is listed, the advice names an option predict.py takes
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert "one_bad.jsonl:2: invalid JSON" in err
    assert err.strip().splitlines()[-1] == ("error: " + str(data) + ": 1 bad record(s) out of 5. Fix them, or pass "
                                            "--skip_bad_lines to predict the rest.")
    assert not out.exists()

    assert run_command(predict.main, argv + ["--skip_bad_lines"]) == 0
    err = capsys.readouterr().err
    assert "one_bad.jsonl:2: invalid JSON" in err and "skipped 1 bad record(s), kept 4" in err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4, 5]
    assert [r["input"] for r in rows] == [r["query"] for r in records]
    assert [r["reference"] for r in rows] == [r["answer"] for r in records]
    metrics = json.loads((tmp_path / "pred.jsonl.metrics.json").read_text(encoding="utf-8"))
    assert metrics["records"] == 4

    # an interrupted run resumes after its last finished record, not after line N of the data file
    full = out.read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15], encoding="utf-8")
    assert run_command(predict.main, argv + ["--skip_bad_lines", "--resume"]) == 0
    assert out.read_text(encoding="utf-8") == full

    # the bad line deleted: same inputs, other lines; appending would mix two numberings in one file
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("\n".join(good) + "\n", encoding="utf-8")
    out.write_text("".join(lines[:2]), encoding="utf-8")
    argv[argv.index(str(data))] = str(fixed)
    assert run_command(predict.main, argv + ["--resume"]) == 2
    assert "pred.jsonl:2: this prediction is for another input than line 2 of the data file" in capsys.readouterr().err

"""predict.py and test_baichuan.py on a tiny 4-bit Baichuan with a (random) adapter."""

import io
import json
import os

import pytest

import predict
import test_baichuan
from cnqlora.cli import run_command
from cnqlora.data import PromptArgs
from cnqlora.generation import GenerationArgs, TextStream, generate_batch, generate_ids
from cnqlora.errors import UserError
from cnqlora.inference import Item, PredictArgs, entity_types, interactive, load_for_inference, prompt_ids
from cnqlora.models import ModelArgs


def sentences(data_dir, n):
    with open(f"{data_dir}/test.txt", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def test_streaming_and_plain_generation_give_the_same_text(loaded, ner_data_dir):
    gen = GenerationArgs(max_new_tokens=24)
    for record in sentences(ner_data_dir, 3):
        ids = prompt_ids(loaded.tokenizer, loaded.template, Item(record["instruct"], record["query"], None), True)
        out = io.StringIO()
        stream = TextStream(loaded.tokenizer, out, skip_prompt_tokens=len(ids))
        streamed = generate_batch(loaded.model, loaded.tokenizer, [ids], gen, streamer=stream)[0]
        assert out.getvalue() == streamed == stream.text
        assert len(streamed) > 0


def test_batched_greedy_equals_one_at_a_time(loaded, ner_data_dir):
    gen = GenerationArgs(max_new_tokens=16)
    prompts = [prompt_ids(loaded.tokenizer, loaded.template, Item(r["instruct"], r["query"], None), True)
               for r in sentences(ner_data_dir, 6)]
    assert len({len(p) for p in prompts}) > 1  # left padding is really exercised
    together = generate_ids(loaded.model, loaded.tokenizer, prompts, gen)
    alone = [generate_ids(loaded.model, loaded.tokenizer, [p], gen)[0] for p in prompts]
    assert together == alone


def test_the_adapter_changes_the_output(loaded, tiny_ner_model_dir, ner_data_dir):
    base = load_for_inference(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"), PromptArgs(), None)
    record = sentences(ner_data_dir, 1)[0]
    ids = prompt_ids(loaded.tokenizer, loaded.template, Item(record["instruct"], record["query"], None), True)
    gen = GenerationArgs(max_new_tokens=12)
    assert generate_ids(base.model, base.tokenizer, [ids], gen) != generate_ids(loaded.model, loaded.tokenizer, [ids], gen)


def test_interactive_mode_through_stdin(loaded):
    args = PredictArgs(interactive=True, instruct="msra")
    args.validate()
    stdin = io.StringIO("张伟在北京\n上海很大\n\nnever read\n")
    out = io.StringIO()
    assert interactive(loaded, args, GenerationArgs(max_new_tokens=8), stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert "+ 加载耗时 load time:" in text and "on cpu" in text and "adapter " in text
    assert text.count("Response: ") == 2
    assert "bye (2 answered)" in text
    # Ctrl-D (end of input) ends it as cleanly as an empty line
    out = io.StringIO()
    interactive(loaded, args, GenerationArgs(max_new_tokens=4), stdin=io.StringIO("张伟\n"), out=out)
    assert "bye (1 answered)" in out.getvalue()

    class CtrlC(io.StringIO):
        def readline(self, *_):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert interactive(loaded, args, GenerationArgs(max_new_tokens=4), stdin=CtrlC(), out=out) == 0
    assert "bye (0 answered)" in out.getvalue()


def test_typed_input_that_is_not_valid_utf8_is_not_answered_and_the_session_goes_on(loaded):
    # Under a C/POSIX locale, stdin turns undecodable bytes into lone surrogates.
    typed = b"\xff\xfe\xe5\xbc\xa0\n".decode("utf-8", "surrogateescape")
    out = io.StringIO()
    args = PredictArgs(interactive=True, instruct="msra")
    interactive(loaded, args, GenerationArgs(max_new_tokens=4), stdin=io.StringIO(typed + "张伟\n"), out=out)
    text = out.getvalue()
    assert "this input is not valid UTF-8, so it was not answered" in text
    assert "bye (1 answered)" in text


def test_the_seeds_interactive_command_line(tiny_ner_model_dir, adapter_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("你现在是一个实体识别模型。文本：王芳在上海\n\n"))
    argv = ["--model_name", "baichuan", "--base_model", tiny_ner_model_dir, "--tokenizer_path", tiny_ner_model_dir,
            "--lora_model", adapter_dir, "--with_prompt", "--interactive", "--only_cpu", "--max_new_tokens", "6"]
    assert run_command(predict.main, argv) == 0
    out = capsys.readouterr().out
    assert "当前使用的模型是：baichuan" in out and "Response: " in out and "bye (1 answered)" in out


def predict_argv(model_dir, adapter, data_file, out_file, *extra):
    return ["--base_model", model_dir, "--lora_model", adapter, "--data_file", data_file,
            "--predictions_file", out_file, "--only_cpu", "--max_new_tokens", "12", "--batch_size", "4", *extra]


def test_file_prediction_writes_jsonl_in_order_with_metrics(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path,
                                                            capsys):
    data = f"{ner_data_dir}/test.txt"
    out = str(tmp_path / "pred.jsonl")
    assert run_command(predict.main, predict_argv(tiny_ner_model_dir, adapter_dir, data, out, "--limit", "10")) == 0
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    expected = sentences(ner_data_dir, 10)
    assert [r["input"] for r in rows] == [r["query"] for r in expected]
    assert [r["reference"] for r in rows] == [r["answer"] for r in expected]
    assert all(isinstance(r["output"], str) for r in rows)
    metrics = json.load(open(out + ".metrics.json", encoding="utf-8"))
    assert metrics["records"] == 10 and set(metrics["per_type"]) <= {"人名", "地名", "机构名"}
    assert metrics["speed"]["sentences_per_s"] > 0
    printed = capsys.readouterr().out
    assert "micro" in printed and "sentences/s" in printed


def test_an_interrupted_file_run_resumes(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path):
    data = f"{ner_data_dir}/test.txt"
    full = str(tmp_path / "full.jsonl")
    part = str(tmp_path / "part.jsonl")
    assert run_command(predict.main, predict_argv(tiny_ner_model_dir, adapter_dir, data, full, "--limit", "12")) == 0
    lines = open(full, encoding="utf-8").read().splitlines(keepends=True)
    # A run that died after 5 lines, in the middle of writing the 6th
    with open(part, "w", encoding="utf-8") as f:
        f.write("".join(lines[:5]) + lines[5][:20])
    assert run_command(predict.main, predict_argv(tiny_ner_model_dir, adapter_dir, data, part, "--limit", "12",
                                                  "--resume")) == 0
    assert open(part, encoding="utf-8").read() == "".join(lines)


def test_resume_refuses_predictions_of_another_file(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path, capsys):
    out = tmp_path / "other.jsonl"
    out.write_text(json.dumps({"instruct": "x", "input": "y", "output": "z"}) + "\n", encoding="utf-8")
    argv = predict_argv(tiny_ner_model_dir, adapter_dir, f"{ner_data_dir}/test.txt", str(out), "--resume")
    assert run_command(predict.main, argv) == 2
    assert "other.jsonl:1: this prediction is for another input" in capsys.readouterr().err


def test_plain_text_lines_with_a_fixed_instruction(tiny_ner_model_dir, adapter_dir, tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("张伟在北京\n\n王芳去了上海\n", encoding="utf-8")
    out = str(tmp_path / "lines.jsonl")
    argv = predict_argv(tiny_ner_model_dir, adapter_dir, str(data), out, "--instruct", "msra")
    assert run_command(predict.main, argv) == 0
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["input"] for r in rows] == ["文本：张伟在北京", "文本：王芳去了上海"]
    assert all("reference" not in r for r in rows)
    assert not os.path.exists(out + ".metrics.json")


def test_grounded_file_prediction_is_always_well_formed(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path,
                                                        capsys):
    out = str(tmp_path / "grounded.jsonl")
    argv = predict_argv(tiny_ner_model_dir, adapter_dir, f"{ner_data_dir}/test.txt", out, "--limit", "8", "--grounded")
    assert run_command(predict.main, argv) == 0
    metrics = json.load(open(out + ".metrics.json", encoding="utf-8"))
    assert metrics["unparseable"] == 0.0 and metrics["not_in_text"] == 0.0
    speed = metrics["speed"]
    assert speed["grounded"] is True
    # where the time went is kept beside the speed: the engine's steps and the answers' setup
    assert speed["engine"]["decode_steps"] > 0 and speed["engine"]["prefill_calls"] > 0
    assert speed["grounding_s"] > 0
    assert "grounded answers set up in" in capsys.readouterr().out


def test_a_tokenizer_grounding_cannot_serve_fails_before_the_model_loads(tiny_ner_model_dir, adapter_dir,
                                                                          ner_data_dir, tmp_path, monkeypatch,
                                                                          capsys):
    def unmappable(tokenizer):
        raise ValueError("cannot map LlamaTokenizer tokens to bytes")

    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr("cnqlora.grounded.token_trie", unmappable)
    monkeypatch.setattr("cnqlora.models.load_model", refuse)
    argv = predict_argv(tiny_ner_model_dir, adapter_dir, f"{ner_data_dir}/test.txt", str(tmp_path / "o.jsonl"),
                        "--grounded")
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert "--grounded: cannot map LlamaTokenizer" in err and "Traceback" not in err, err


def test_bad_inputs_give_one_message_and_exit_2(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path, capsys):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_bytes(b'{"instruct": "a"}\n{"instruct": 3}\n')
    not_adapter = tmp_path / "empty_adapter"
    not_adapter.mkdir()
    cases = [
        (predict_argv(str(tmp_path / "no-model"), adapter_dir, f"{ner_data_dir}/test.txt", str(tmp_path / "o1")),
         "no-model: model folder not found"),
        (predict_argv(tiny_ner_model_dir, str(tmp_path / "no-adapter"), f"{ner_data_dir}/test.txt",
                      str(tmp_path / "o2")), "no-adapter"),
        (predict_argv(tiny_ner_model_dir, str(not_adapter), f"{ner_data_dir}/test.txt", str(tmp_path / "o3")),
         "empty_adapter"),
        (predict_argv(tiny_ner_model_dir, adapter_dir, str(bad_data), str(tmp_path / "o4")),
         "bad.jsonl:2: 'instruct' must be a string"),
        (predict_argv(tiny_ner_model_dir, adapter_dir, str(tmp_path / "missing.txt"), str(tmp_path / "o5")),
         "missing.txt: file not found"),
    ]
    for argv, message in cases:
        assert run_command(predict.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_grounded_types_are_read_with_the_adapters_own_columns(tmp_path):
    import yaml

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "找出实体", "text": "文本：张伟在北京", "label": "张伟_人名\n北京_地名"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "train_config.yaml").write_text(yaml.safe_dump(
        {"instruct_column": "instruction", "query_column": "text", "answer_column": "label",
         "train_file": str(data)}), encoding="utf-8")
    assert entity_types(PredictArgs(lora_model=str(adapter), grounded=True), []) == ["人名", "地名"]


def test_a_damaged_train_config_means_no_types_and_a_clear_message(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "train_config.yaml").write_text("train_file: [not closed\n", encoding="utf-8")
    with pytest.raises(UserError, match="--grounded needs the entity types"):
        entity_types(PredictArgs(lora_model=str(adapter), grounded=True), [])


def test_interactive_grounded_without_types_gives_the_message_not_a_traceback(tiny_ner_model_dir, adapter_dir,
                                                                                 monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("张伟在北京\n\n"))
    argv = ["--base_model", tiny_ner_model_dir, "--lora_model", adapter_dir, "--interactive", "--grounded",
            "--only_cpu", "--max_new_tokens", "6"]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert "--grounded needs the entity types" in err and "Traceback" not in err, err


def test_test_baichuan_checks_a_model(tiny_ner_model_dir, capsys, tmp_path):
    assert run_command(test_baichuan.main, ["--model_name_or_path", tiny_ner_model_dir, "--device", "cpu",
                                            "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "load time:" in out and "tokens/s" in out and "登鹳雀楼->王之涣\n夜雨寄北->" in out
    assert "BaichuanForCausalLM" in out and "4bit" in out

    assert run_command(test_baichuan.main, ["--model_name_or_path", str(tmp_path / "none")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (t5 / "model.safetensors").write_bytes(b"")
    (t5 / "tokenizer.json").write_text("{}")
    assert run_command(test_baichuan.main, ["--model_name_or_path", str(t5)]) == 2
    assert "not a causal (text-generating) language model" in capsys.readouterr().err


def test_merge_from_the_command_line(tiny_ner_model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["--base_model", tiny_ner_model_dir, "--lora_model", adapter_dir, "--merge_to", str(out),
            "--merge_dtype", "float32", "--only_cpu"]
    assert run_command(predict.main, argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"  # Baichuan written as plain LLaMA: no custom code needed
    assert not [n for n in os.listdir(out) if n.startswith("adapter_") or n.endswith(".py")]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    marker = json.loads((out / "cnqlora_merge.json").read_text())
    assert marker["check"]["ok"] is True
    # a second merge into a folder that is not a previous merge is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert run_command(predict.main, argv[:5] + [str(other), "--only_cpu"]) == 2
    assert "keep.txt" in str(os.listdir(other)) and "error:" in capsys.readouterr().err


def _adapter_trained_with_eos(adapter_dir, tmp_path, eos):
    """A copy of the adapter whose saved tokenizer names another EOS, as when the base folder was
    converted again by a newer transformers (Qwen2.5 GGUF: <|endoftext|> against <|im_end|>)."""
    import shutil

    copy = tmp_path / "adapter_other_eos"
    shutil.copytree(adapter_dir, copy)
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["eos_token"] = eos
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return str(copy)


def test_answers_stop_at_the_eos_the_adapter_was_trained_with(tiny_ner_model_dir, adapter_dir, ner_data_dir,
                                                               tmp_path, capsys):
    from cnqlora.generation import stop_token_ids

    adapter = _adapter_trained_with_eos(adapter_dir, tmp_path, "<s>")
    loaded = load_for_inference(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"), PromptArgs(), adapter)
    trained, base = loaded.tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    assert "trained to end answers with '<s>'" in capsys.readouterr().out
    assert loaded.tokenizer.eos_token_id == trained
    assert {trained, base} <= set(stop_token_ids(loaded.tokenizer, loaded.model))
    # a model that writes the trained EOS first: its answers must end there, not run on to max_new_tokens
    records = sentences(ner_data_dir, 2)
    prompts = [prompt_ids(loaded.tokenizer, loaded.template, Item(r["instruct"], r["query"], None), True)
               for r in records]

    def trained_eos_first(input_ids, scores):
        scores[:, trained] = scores.max() + 1
        return scores

    rows = generate_ids(loaded.model, loaded.tokenizer, prompts, GenerationArgs(max_new_tokens=8),
                        lambda ids, n: trained_eos_first)
    assert rows == [[], []]


def test_an_adapter_with_the_bases_eos_changes_nothing(loaded):
    assert loaded.tokenizer.eos_token == "</s>"
    assert loaded.model.generation_config.eos_token_id in (2, [2])


def test_an_eos_the_base_does_not_know_is_a_warning(tiny_ner_model_dir, adapter_dir, tmp_path, capsys):
    adapter = _adapter_trained_with_eos(adapter_dir, tmp_path, "<|im_end|>")
    loaded = load_for_inference(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"), PromptArgs(), adapter)
    assert "does not know" in capsys.readouterr().out
    assert loaded.tokenizer.eos_token == "</s>"


def test_a_merge_stops_where_its_adapter_does(tiny_ner_model_dir, adapter_dir, tmp_path):
    adapter = _adapter_trained_with_eos(adapter_dir, tmp_path, "<s>")
    out = tmp_path / "merged"
    argv = ["--base_model", tiny_ner_model_dir, "--lora_model", adapter, "--merge_to", str(out),
            "--merge_dtype", "float32", "--only_cpu"]
    assert run_command(predict.main, argv) == 0
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    trained, base = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    assert tokenizer.eos_token == "<s>"
    assert {trained, base} <= set(GenerationConfig.from_pretrained(out).eos_token_id)


def test_fused_kernels_on_the_cpu_are_refused_before_the_model_loads(tiny_ner_model_dir, monkeypatch, capsys):
    import cnqlora.models

    def no_loading(*_, **__):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(cnqlora.models, "load_model", no_loading)
    argv = ["--base_model", tiny_ner_model_dir, "--interactive", "--only_cpu", "--fused_kernels", "liger"]
    assert run_command(predict.main, argv) == 2
    err = capsys.readouterr().err
    assert "--fused_kernels liger needs a CUDA GPU" in err and "Traceback" not in err, err

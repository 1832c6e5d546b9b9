"""The training spine end to end on a tiny 4-bit Baichuan: outputs, reload, resume, demo, bad input."""

import functools
import json
import os

import pytest
import torch
import yaml

import baichuan_qlora
from cnqlora.cli import run_command
from cnqlora.config import parse_options
from cnqlora.errors import UserError
from cnqlora.training import TRAIN_SECTIONS, list_checkpoints, train


def options(model_dir, data_dir, out_dir, *extra):
    return parse_options(TRAIN_SECTIONS, command_line(model_dir, data_dir, out_dir, *extra))


def command_line(model_dir, data_dir, out_dir, *extra):
    """baichuan_qlora.py's arguments for a 6-step run on the tiny NER model."""
    return ["--model_name_or_path", model_dir, "--train_file", f"{data_dir}/train.txt",
            "--dev_file", f"{data_dir}/dev.txt", "--output_dir", str(out_dir), "--run_name", "run",
            "--device", "cpu", "--quantization", "4bit", "--max_seq_len", "96", "--batch_size", "4",
            "--gradient_accumulation_steps", "2", "--max_steps", "6", "--learning_rate", "5e-3",
            "--lora_dropout", "0.1", "--logging_steps", "1", "--eval_steps", "3", "--save_steps", "3",
            "--memory_mode", "fast", *extra]


def run(model_dir, data_dir, out_dir, *extra, callbacks=(), log=lambda _: None):
    return train(*options(model_dir, data_dir, out_dir, *extra), log=log, callbacks=callbacks)


def crash_then_resume(model_dir, data_dir, out_dir, *extra, crash_step=5):
    """A run that dies after `crash_step` steps (no final adapter), then `--resume_from_checkpoint auto`."""

    class Crash(Exception):
        pass

    def crash(step, **_):
        if step == crash_step:
            raise Crash

    with pytest.raises(Crash):
        run(model_dir, data_dir, out_dir, *extra, callbacks=[crash])
    assert not (out_dir / "run" / "adapter_model").exists()
    return run(model_dir, data_dir, out_dir, *extra, "--resume_from_checkpoint", "auto")


def train_losses(history):
    return [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]


def test_training_writes_a_standard_peft_adapter(tiny_ner_model_dir, ner_data_dir, tmp_path):
    result = run(tiny_ner_model_dir, ner_data_dir, tmp_path)
    adapter = tmp_path / "run" / "adapter_model"
    assert result["adapter_dir"] == str(adapter)
    names = set(os.listdir(adapter))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "train_config.yaml"} <= names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == ["W_pack", "down_proj", "gate_proj", "o_proj", "up_proj"]
    run_dir = tmp_path / "run"
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tb"))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged if "eval_loss" in h] == [0, 3, 6]
    assert len(train_losses(logged)) == 6
    # The last checkpoint is not written at the end: the adapter is the end.
    assert [os.path.basename(p) for p in list_checkpoints(str(run_dir))] == ["step-000003"]
    assert not [n for n in os.listdir(run_dir) if ".tmp-" in n or ".old-" in n]


def test_adapter_save_then_load_gives_identical_logits(tiny_ner_model_dir, tmp_path):
    from peft import PeftModel

    from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model, load_tokenizer
    from cnqlora.training import save_adapter

    model_args = ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")
    torch.manual_seed(0)
    model, _ = attach_lora(load_model(model_args), LoraArgs())
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    expected = model(input_ids=ids).logits
    dest = save_adapter(model, load_tokenizer(tiny_ner_model_dir), str(tmp_path / "adapter_model"), "x: 1\n")
    reloaded = PeftModel.from_pretrained(load_model(model_args), dest).eval()
    base_only = load_model(model_args).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        assert not torch.allclose(base_only(input_ids=ids).logits, expected)


def test_a_resumed_run_reproduces_the_uninterrupted_one(tiny_ner_model_dir, ner_data_dir, tmp_path):
    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a")
    resumed = crash_then_resume(tiny_ner_model_dir, ner_data_dir, tmp_path / "b")

    assert resumed["steps"] == 6
    # Exact: the resumed run replays the same batches, RNG states and arithmetic.
    assert train_losses(resumed["history"]) == train_losses(full["history"])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "adapter_model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # Steps 4-6 were trained again after the crash; metrics.jsonl holds each step once.
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_folder_that_is_not_a_checkpoint(tiny_ner_model_dir, ner_data_dir, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_ner_model_dir, "--train_file", f"{ner_data_dir}/train.txt",
            "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(tmp_path)]
    assert run_command(baichuan_qlora.main, argv) == 2
    assert "not a checkpoint folder (no trainer_state.pt)" in capsys.readouterr().err


def test_demo_config_prepares_data_builds_a_model_and_the_loss_falls(ner_bio_file, tmp_path, monkeypatch):
    """configs/demo.yaml on a fresh folder: MSRA is 'fetched' (here: a local synthetic corpus),
    a tiny Baichuan-layout model is built, and training through 4-bit + LoRA lowers the loss."""
    import cnqlora.msra as msra

    monkeypatch.setattr(msra, "fetch_msra", lambda cache_dir: ner_bio_file)
    monkeypatch.setattr(msra, "MSRA_SENTENCES", 400)
    monkeypatch.setattr(msra, "MSRA_TRAIN_SENTENCES", 350)
    monkeypatch.setattr(msra, "prepare_msra", functools.partial(msra.prepare_msra, dev_size=30))
    monkeypatch.chdir(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--config", os.path.join(root, "configs", "demo.yaml"), "--max_steps", "40", "--eval_steps", "20",
            "--save_steps", "0", "--batch_size", "8"]
    assert run_command(baichuan_qlora.main, argv) == 0
    assert os.path.isfile("data/msra/train.txt") and os.path.isfile("data/msra/test.txt")
    model_files = set(os.listdir("model_hub/tiny-baichuan-demo"))
    assert {"config.json", "pytorch_model.bin", "tokenizer.model", "tokenizer_config.json"} <= model_files
    assert not [n for n in model_files if n.endswith(".py")]
    history = [json.loads(line) for line in open("checkpoint/demo/metrics.jsonl", encoding="utf-8")]
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    assert evals[-1] < evals[0]
    assert os.path.isfile("checkpoint/demo/adapter_model/adapter_model.safetensors")


# --------------------------------------------------------------------------- bad input, before any model


def bad_input_cases(tmp_path, model_dir, data_dir):
    good = f"{data_dir}/train.txt"
    bad = tmp_path / "bad.txt"
    bad.write_text(open(good, encoding="utf-8").readline() + '{"instruct": "x", "answer": ""}\n'
                   + "{oops\n", encoding="utf-8")
    missing_shard = tmp_path / "sharded"
    missing_shard.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (missing_shard / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    (missing_shard / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    (missing_shard / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    no_model = str(tmp_path / "nothing-here")
    yaml_file = tmp_path / "typo.yaml"
    yaml_file.write_text("lora_r: 8\nlearnig_rate: 1e-4\n", encoding="utf-8")
    return [
        (["--train_file", str(bad), "--model_name_or_path", no_model], 2,
         [f"{bad}:2: 'answer' is empty", f"{bad}:3: invalid JSON", "2 bad record(s) out of 3"]),
        (["--train_file", str(tmp_path / "none.txt"), "--model_name_or_path", model_dir], 2, ["none.txt: file not found"]),
        (["--train_file", good, "--model_name_or_path", no_model], 2, ["nothing-here: model folder not found"]),
        (["--train_file", good, "--model_name_or_path", str(missing_shard)], 2,
         ["missing weight shard(s) pytorch_model-00002-of-00002.bin"]),
        (["--train_file", good, "--model_name_or_path", model_dir, "--lora_target", "q_proj,v_proj"], 2,
         ["q_proj, v_proj not found", "W_pack"]),
        (["--config", str(yaml_file)], 2, [f"{yaml_file}:2: unknown option 'learnig_rate'"]),
    ]


def test_each_bad_input_gives_its_message_and_exit_code(tiny_ner_model_dir, ner_data_dir, tmp_path, capsys):
    for argv, code, messages in bad_input_cases(tmp_path, tiny_ner_model_dir, ner_data_dir):
        argv = argv + ["--output_dir", str(tmp_path / "out"), "--dev_file", "none", "--max_steps", "1",
                       "--device", "cpu"]
        assert run_command(baichuan_qlora.main, argv) == code, argv
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, (argv, err)
        assert "Traceback" not in err


def test_skip_bad_lines_trains_on_the_rest(tiny_ner_model_dir, ner_data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    lines = open(f"{ner_data_dir}/train.txt", encoding="utf-8").read().splitlines()[:12]
    bad.write_text("\n".join(lines[:6] + ["not json"] + lines[6:]) + "\n", encoding="utf-8")
    argv = ["--model_name_or_path", tiny_ner_model_dir, "--train_file", str(bad), "--dev_file", "none",
            "--skip_bad_lines", "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--batch_size", "4",
            "--memory_mode", "fast", "--tensorboard", "false"]
    assert run_command(baichuan_qlora.main, argv) == 0
    captured = capsys.readouterr()
    assert f"{bad}:7: invalid JSON" in captured.err
    assert f"{bad}: skipped 1 bad record(s), kept 12" in captured.err
    assert "train: 12 records -> 12 samples" in captured.out


def test_a_non_finite_step_is_skipped_not_spread(tiny_ner_model_dir, ner_data_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss in one batch skips that update; the adapter stays finite and training goes on."""
    import math

    import cnqlora.training as training

    real_loss_sum = training.loss_sum
    calls = {"n": 0}

    def nan_on_third_micro_batch(model, batch):
        calls["n"] += 1
        loss = real_loss_sum(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "loss_sum", nan_on_third_micro_batch)
    result = run(tiny_ner_model_dir, ner_data_dir, tmp_path, "--eval_steps", "0")
    assert result["steps"] == 6
    logged = [h for h in result["history"] if "train_loss" in h]
    assert all(math.isfinite(h["train_loss"]) for h in logged)
    assert logged[-1]["train_skipped_steps"] == 1
    assert "step 2: gradient norm nan, update skipped (1 so far)" in capsys.readouterr().err
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "adapter_model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_training_stops_when_non_finite_steps_are_not_rare(tiny_ner_model_dir, ner_data_dir, tmp_path, monkeypatch):
    import cnqlora.training as training

    real_loss_sum = training.loss_sum
    monkeypatch.setattr(training, "loss_sum", lambda model, batch: real_loss_sum(model, batch) * float("inf"))
    with pytest.raises(UserError, match="20 of 20 steps had non-finite gradients"):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path, "--max_steps", "30", "--eval_steps", "0", "--save_steps", "0",
            "--gradient_accumulation_steps", "1")


def test_spread_takes_records_evenly_over_the_file():
    from cnqlora.training import spread

    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(10)), 10) == list(range(10))
    assert spread(list(range(10)), None) == list(range(10))
    assert spread(list(range(10)), 0) == list(range(10))
    assert spread(list(range(3)), 5) == [0, 1, 2]


def test_dev_records_are_spread_over_the_dev_file(tiny_ner_model_dir, ner_data_dir, tmp_path):
    from cnqlora.training import _prepare_inputs

    model_args, prompt_args, data_args, _, train_args = options(tiny_ner_model_dir, ner_data_dir, tmp_path,
                                                                "--max_dev_samples", "10")
    _, dev, _ = _prepare_inputs(model_args, prompt_args, data_args, train_args, log=lambda _: None)
    with open(f"{ner_data_dir}/dev.txt", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 30
    assert [r["line"] for r in dev] == list(range(1, 31, 3))


def test_missing_msra_train_joined_is_prepared_with_the_join_option(tiny_ner_model_dir, tmp_path, monkeypatch):
    """On a fresh folder the auto-prepare builds train_joined.txt (the list copies included) when
    asked to, and says what to set when it was not."""
    import cnqlora.msra as msra
    from cnqlora.tiny import write_bio
    from cnqlora.training import DataArgs, _prepare_inputs

    listed = [("王", "B-PER"), ("五", "I-PER"), ("、", "O"), ("赵", "B-PER"), ("六", "I-PER"), ("、", "O"),
              ("孙", "B-PER"), ("七", "I-PER")]
    corpus = write_bio(str(tmp_path / "corpus.txt"), [listed, [("今", "O"), ("天", "O")], listed, [("京", "B-LOC")]])
    monkeypatch.setattr(msra, "fetch_msra", lambda cache_dir: corpus)
    monkeypatch.setattr(msra, "MSRA_SENTENCES", 4)
    monkeypatch.setattr(msra, "MSRA_TRAIN_SENTENCES", 3)
    monkeypatch.setattr(msra, "prepare_msra", functools.partial(msra.prepare_msra, dev_size=1))
    model_args, prompt_args, _, _, train_args = options(tiny_ner_model_dir, str(tmp_path), tmp_path)

    def prepare(folder, join_lists):
        data_args = DataArgs(train_file=str(tmp_path / folder / "train_joined.txt"), dev_file=None,
                             prepare_msra_if_missing=True, prepare_msra_join_lists=join_lists)
        return _prepare_inputs(model_args, prompt_args, data_args, train_args, log=lambda _: None)

    with pytest.raises(UserError, match="train_joined.txt: not among the MSRA files just prepared.*"
                                        "prepare_msra_join_lists"):
        prepare("plain", 0)
    assert sorted(os.listdir(tmp_path / "plain")) == ["dev.txt", "meta.json", "test.txt", "train.txt"]
    train, _, _ = prepare("joined", 2)
    # the two training sentences, then the list copied without its 、
    assert [r["query"] for r in train] == ["文本：王五、赵六、孙七", "文本：今天", "文本：王五赵六孙七"]


def test_the_msra_config_builds_the_file_it_trains_on():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "msra_qwen0.5b.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    assert os.path.basename(config["train_file"]) == "train_joined.txt"
    assert config["prepare_msra_if_missing"] and config["prepare_msra_join_lists"] > 0

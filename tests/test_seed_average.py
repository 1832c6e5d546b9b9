"""baichuan_qlora.py --average_seeds: one run per seed, then the mean of their adapters, scored on dev."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import baichuan_qlora
from cnqlora.cli import run_command
from cnqlora.evaluation import DevNerEvaluator
from test_training import run

EVAL = ("--eval_f1_steps", "3", "--eval_f1_samples", "4", "--eval_max_new_tokens", "8")


def deltas(adapter_dir):
    """Each LoRA layer's weight change, scale included: {layer: scale * B @ A}."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {key.replace(".lora_A.weight", ""): scale * weights[key.replace("lora_A", "lora_B")].float() @ value.float()
            for key, value in weights.items() if key.endswith("lora_A.weight")}


def test_each_seed_is_a_run_and_the_average_is_their_mean(tiny_ner_model_dir, ner_data_dir, tmp_path, monkeypatch):
    # seed 1 scores 0.2 then 0.4, seed 2 0.5 then 0.3; the average is scored last
    scores = iter([0.2, 0.4, 0.5, 0.3, 0.6])

    def scripted(self, model):
        f1 = next(scores)
        return {"micro": {"f1": f1, "precision": f1, "recall": f1}, "exact_match": f1, "unparseable": 0.0,
                "records": len(self.records)}

    monkeypatch.setattr(DevNerEvaluator, "__call__", scripted)
    lines = []
    result = run(tiny_ner_model_dir, ner_data_dir, tmp_path, *EVAL, "--average_seeds", "1,2", log=lines.append)

    run_dir = tmp_path / "run"
    assert [r["steps"] for r in result["trained"]] == [6, 6]
    assert result["members"] == [str(run_dir / "seed-1" / "best_adapter"), str(run_dir / "seed-2" / "best_adapter")]
    for seed in (1, 2):
        config = (run_dir / f"seed-{seed}" / "train_config.yaml").read_text()
        assert f"seed: {seed}\n" in config
    average = run_dir / "average_adapter"
    assert result["adapter_dir"] == str(average)
    one, two, mean = (deltas(run_dir / "seed-1" / "best_adapter"), deltas(run_dir / "seed-2" / "best_adapter"),
                      deltas(average))
    assert mean.keys() == one.keys()
    for layer in mean:
        assert not torch.allclose(one[layer], two[layer])  # the seeds really are different runs
        torch.testing.assert_close(mean[layer], (one[layer] + two[layer]) / 2, rtol=1e-5, atol=1e-7)
    record = json.loads((average / "dev_metrics.json").read_text())
    assert [(m["dev_f1"], m["step"]) for m in record["members"]] == [(0.4, 6), (0.5, 3)]
    assert record["members_mean_dev_f1"] == pytest.approx(0.45)
    assert record["micro"]["f1"] == 0.6
    assert any("dev F1 60.00 on 4 dev records" in line and "mean 45.00" in line for line in lines)
    assert not any("not above its members' mean" in line for line in lines)
    assert "--seed is not used" in lines[0]


def test_a_stopped_average_resumes_without_training_finished_seeds_again(tiny_ner_model_dir, ner_data_dir, tmp_path):
    class Crash(Exception):
        pass

    seen = []

    def crash_in_the_second_seed(step, **_):
        seen.append(step)
        if seen.count(4) == 2:
            raise Crash

    with pytest.raises(Crash):
        run(tiny_ner_model_dir, ner_data_dir, tmp_path, *EVAL, "--average_seeds", "1,2",
            callbacks=[crash_in_the_second_seed])
    first = tmp_path / "run" / "seed-1" / "adapter_model" / "adapter_model.safetensors"
    written = os.stat(first).st_mtime_ns
    assert not (tmp_path / "run" / "average_adapter").exists()

    lines = []
    result = run(tiny_ner_model_dir, ner_data_dir, tmp_path, *EVAL, "--average_seeds", "1,2",
                 "--resume_from_checkpoint", "auto", log=lines.append)
    assert os.stat(first).st_mtime_ns == written
    assert any("seed 1 (1 of 2): finished before" in line for line in lines)
    assert any("resumed from" in line and "seed-2" in line for line in lines)
    assert [r["steps"] for r in result["trained"]] == [6]
    # the real evaluator, on the averaged adapter loaded over the 4-bit base
    record = json.loads((tmp_path / "run" / "average_adapter" / "dev_metrics.json").read_text())
    assert record["records"] == 4 and 0.0 <= record["micro"]["f1"] <= 1.0
    assert len(record["members"]) == 2
    noted = any("not above its members' mean" in line for line in lines)
    assert noted == (record["micro"]["f1"] <= record["members_mean_dev_f1"])


@pytest.mark.parametrize("extra, message", [
    (["--average_seeds", "7"], "give two or more different seeds"),
    (["--average_seeds", "7,7"], "give two or more different seeds"),
    (["--average_seeds", "7,8", "--resume_from_checkpoint", "somewhere"], "use --resume_from_checkpoint auto"),
])
def test_bad_seed_lists_are_refused_before_anything_loads(tmp_path, capsys, extra, message):
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--train_file", str(tmp_path / "no-data.txt"), *extra]
    assert run_command(baichuan_qlora.main, argv) == 2
    assert message in capsys.readouterr().err


def test_the_msra_config_averages_four_seeds_and_one_option_makes_it_one_run():
    from cnqlora.config import parse_options
    from cnqlora.training import TRAIN_SECTIONS

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "msra_qwen0.5b.yaml")
    *_, train_args = parse_options(TRAIN_SECTIONS, ["--config", config])
    assert train_args.average_seeds == [45, 46, 47, 48]
    # bench/msra_qwen_gpu.sh trains one seed per run this way
    *_, train_args = parse_options(TRAIN_SECTIONS, ["--config", config, "--average_seeds", "", "--seed", "45"])
    assert train_args.average_seeds == [] and train_args.seed == 45

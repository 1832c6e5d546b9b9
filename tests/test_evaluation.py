"""Dev F1 during training and keeping the best adapter."""

import json
import os

import torch

import cnqlora.evaluation as evaluation
from cnqlora.evaluation import DevNerEvaluator, best_so_far


def dev_records(data_dir, n):
    return [json.loads(line) for line in open(f"{data_dir}/dev.txt", encoding="utf-8")][:n]


def test_the_evaluator_maps_answers_back_to_their_records(tiny_ner_model_dir, ner_data_dir, monkeypatch):
    """Batches are sorted by length; each answer must still be scored against its own record."""
    from cnqlora.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    records = dev_records(ner_data_dir, 12)
    evaluator = DevNerEvaluator(tokenizer, "baichuan", records, batch_size=5)
    by_prompt = {tuple(p): r["answer"] for p, r in zip(evaluator.prompts, records)}

    def perfect(model, tok, prompts, gen, **options):
        return [by_prompt[tuple(p)] for p in prompts]

    monkeypatch.setattr(evaluation, "answer_many", perfect)
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"))
    result = evaluator(model)
    assert result["records"] == 12 and result["exact_match"] == 1.0 and result["unparseable"] == 0.0
    assert result["micro"]["tp"] > 0 and result["micro"]["f1"] == 1.0

    monkeypatch.setattr(evaluation, "answer_many", lambda m, tok, prompts, gen, **options: ["" for _ in prompts])
    empty = evaluator(model)
    assert empty["unparseable"] == 1.0 and empty["micro"]["tp"] == 0


def test_the_real_evaluator_runs_greedy_generation(tiny_ner_model_dir, ner_data_dir):
    from cnqlora.models import ModelArgs, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"))
    model.train()
    result = DevNerEvaluator(tokenizer, "baichuan", dev_records(ner_data_dir, 6), max_new_tokens=8)(model)
    assert result["records"] == 6 and 0.0 <= result["micro"]["f1"] <= 1.0
    assert model.training  # the training mode is restored


def test_the_best_adapter_by_dev_f1_is_kept(tiny_ner_model_dir, ner_data_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from test_training import run

    scores = iter([0.20, 0.50, 0.40])

    def scripted(self, model):
        f1 = next(scores)
        return {"micro": {"f1": f1, "precision": f1, "recall": f1}, "exact_match": f1, "unparseable": 0.0}

    monkeypatch.setattr(DevNerEvaluator, "__call__", scripted)
    result = run(tiny_ner_model_dir, ner_data_dir, tmp_path, "--eval_f1_steps", "2", "--save_steps", "2",
                 "--save_total_limit", "5")
    assert result["best"]["step"] == 4 and result["best"]["dev_f1"] == 0.5
    run_dir = tmp_path / "run"
    marker = json.loads((run_dir / "best_adapter" / "dev_metrics.json").read_text())
    assert marker["step"] == 4
    best = load_file(str(run_dir / "best_adapter" / "adapter_model.safetensors"))
    at_step_4 = load_file(str(run_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "adapter_model" / "adapter_model.safetensors"))
    assert all(torch.equal(best[k], at_step_4[k]) for k in best)
    assert not all(torch.equal(best[k], final[k]) for k in best)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["dev_f1"]) for h in logged if "dev_f1" in h] == [(2, 0.2), (4, 0.5), (6, 0.4)]
    assert best_so_far(logged) == (0.5, 4)
    assert os.path.isfile(run_dir / "best_adapter" / "adapter_config.json")


def test_best_so_far_starts_empty():
    assert best_so_far([{"step": 3, "train_loss": 1.0}]) == (-1.0, 0)

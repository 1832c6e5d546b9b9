"""The GPU benchmarks (bench/*.py) run end to end in --tiny mode on the CPU.

GPU time is scarce, so everything but the CUDA-only measurements (matmul peak, memory stats) is
exercised here: data preparation, the random 4-bit model, every training recipe, the plain-vs-fast
check, the seed's prediction loop, the batched paths and the merged model.
"""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_speed():
    return load("train_speed")


@pytest.fixture(scope="module")
def predict_speed():
    return load("predict_speed")


def table_rows(out: str) -> dict[str, list[str]]:
    """Rows of the last markdown table printed, by their first cell."""
    block = out.strip().split("\n\n")[-1].splitlines()
    assert block[0].startswith("| ") and block[1].startswith("| ---"), out[-2000:]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in block[2:])}


# The seed recipe deliberately keeps the seed's calls (peft's default, reentrant checkpointing).
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning",
                            "ignore:.*use_reentrant.*:UserWarning")
def test_train_speed_tiny_runs_every_recipe_and_the_check(train_speed, tmp_path, capsys):
    report = tmp_path / "train.json"
    rc = train_speed.main(["--tiny", "--workdir", str(tmp_path / "data"), "--json", str(report),
                           "--steps", "2", "--warmup", "1", "--check_steps", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    rows = table_rows(out)
    assert set(rows) == set(train_speed.RECIPES)
    assert all(row[-1] == "ok" for row in rows.values()), rows
    data = json.loads(report.read_text())
    for name, result in data["recipes"].items():
        assert result["samples_per_s"] > 0 and result["tokens_per_s"] > 0, name
        assert result["steps"] == 2 and math.isfinite(result["mean_loss"]), name
        assert result["tokens"] > result["samples"], name
    assert data["recipes"]["seed"]["ratio_to_seed"] == pytest.approx(1.0)
    assert data["recipes"]["seed"]["trainable"] == 2 * 8 * 64 * 4  # r * (in + 3 * in) per layer, 2 layers
    check = data["check"]
    assert check["status"] == "ok" and check["steps"] == 2
    losses = [check[k] for k in ("eval_loss_before", "eval_loss_plain", "eval_loss_fast",
                                 "last_step_loss_plain", "last_step_loss_fast")]
    assert all(math.isfinite(x) for x in losses), check
    assert check["eval_loss_plain"] < check["eval_loss_before"]  # it trains
    # On the CPU both paths compute in fp32 (no autocast): they must agree to rounding.
    assert check["eval_rel_diff"] < 1e-4 and check["last_step_rel_diff"] < 1e-4, check
    assert check["verdict"].startswith("MATCH") and check["grad_cosine"] > 0.9999
    assert "Check after 2 steps" in out and "data:" in out and "recipe seed:" in out


def test_the_check_catches_a_fast_path_that_trains_on_shifted_labels(train_speed, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F

    plain_loss_sum = train_speed.loss_sum

    def shifted(model, batch, attention_mask=False):
        if attention_mask:  # the common evaluator stays right
            return plain_loss_sum(model, batch, attention_mask)
        base = model.get_base_model()
        hidden = base.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = base.get_output_embeddings()(hidden[:, 1:][keep])  # predicts the current token
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")

    monkeypatch.setattr(train_speed, "loss_sum", shifted)
    report = tmp_path / "check.json"
    train_speed.main(["--tiny", "--workdir", str(tmp_path), "--recipes", "", "--check_steps", "2",
                      "--json", str(report)])
    assert "MISMATCH" in capsys.readouterr().out
    assert json.loads(report.read_text())["check"]["grad_cosine"] < 0.99


def test_train_speed_time_budget_skips_and_still_reports(train_speed, tmp_path, capsys):
    rc = train_speed.main(["--tiny", "--workdir", str(tmp_path), "--recipes", "seed,lean-4096",
                           "--time_budget", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = table_rows(out)
    assert list(rows) == ["seed", "lean-4096"]
    assert all("skipped" in row[-1] for row in rows.values())
    assert "SKIPPED the plain-vs-fast check" in out


def test_train_speed_rejects_unknown_recipes(train_speed):
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--tiny", "--recipes", "seed,fastest"])


def test_seed_samples_are_cut_to_192_and_padded_with_eos(train_speed, tmp_path):
    from bench import common

    _, tokenizer_path = common.write_tiny_inputs(str(tmp_path))
    tokenizer = common.load_tokenizer(tokenizer_path)
    short = {"instruct": "找实体", "query": "文本：北京", "answer": "北京_地名"}
    ids, labels, real = train_speed.seed_encode(tokenizer, short)
    prompt = tokenizer.encode(common.seed_prompt(short), add_special_tokens=False)
    assert len(ids) == len(labels) == train_speed.SEED_LEN
    assert ids[real:] == [tokenizer.eos_token_id] * (train_speed.SEED_LEN - real)
    assert labels[:len(prompt)] == [-100] * len(prompt) and set(labels[real:]) == {-100}
    # "<s>" and "</s>" written in the target are the special tokens, as in the seed.
    target = labels[len(prompt):real]
    assert target[0] == tokenizer.bos_token_id and target[-1] == tokenizer.eos_token_id
    long = dict(short, query="文本：" + "北京上海" * 200)
    ids, labels, real = train_speed.seed_encode(tokenizer, long)
    assert real == train_speed.SEED_LEN and set(labels) == {-100}  # the seed's cut loses the answer


def test_random_nf4_model_and_its_dequantised_copy_compute_the_same(tmp_path):
    import bitsandbytes as bnb

    from bench import common

    config = common.model_config(tiny=True, vocab_size=300)
    model = common.build_model(config, "cpu", seed=3, compute_dtype=torch.float32).eval()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 5 and model.is_loaded_in_4bit
    assert model.get_output_embeddings().weight.dtype == torch.float32
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        quantised = model(input_ids=ids).logits
        common.dequantize_model(model, torch.float32)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, quantised, rtol=1e-4, atol=1e-4)


def test_predict_speed_tiny_runs_every_path(predict_speed, tmp_path, capsys):
    report = tmp_path / "predict.json"
    rc = predict_speed.main(["--tiny", "--workdir", str(tmp_path / "data"), "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    rows = table_rows(out)
    assert list(rows) == ["seed-loop", "batched-nf4", "batched-merged"]
    assert all(row[-1] == "ok" for row in rows.values()), rows
    paths = json.loads(report.read_text())["paths"]
    for name, result in paths.items():
        assert result["sentences_per_s"] > 0, name
        assert result["min_new_tokens"] == result["max_new_tokens"] == 16, name  # EOS never ends a row early
    assert paths["seed-loop"]["sentences"] == 4
    assert paths["batched-nf4"]["sentences"] == paths["batched-merged"]["sentences"] == 80  # the tiny test split
    assert paths["batched-merged"]["same_output_as_nf4"] >= 0.9
    assert "vs the seed's loop" in out


@pytest.mark.parametrize("shape", ["baichuan7b", "qwen0.5b"])
def test_predict_speed_engine_suite_forces_each_workloads_lengths(predict_speed, tmp_path, capsys, shape):
    report = tmp_path / "engine.json"
    rc = predict_speed.main(["--suite", "engine", "--tiny", "--shape", shape, "--workdir", str(tmp_path / "data"),
                             "--hf_records", "16", "--engine_batch", "8", "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    paths = json.loads(report.read_text())["paths"]
    engines = [r for r in paths.values() if r.get("path") == "engine"]
    generates = [r for r in paths.values() if r.get("path") == "generate"]
    assert len(engines) == len(generates) == (2 if shape == "qwen0.5b" else 4)
    for r in paths.values():
        assert r["status"] == "ok" and r["sentences_per_s"] > 0
        if r["workload"] == "fixed":
            assert r["min_new_tokens"] == r["max_new_tokens"] == 16
    # the reference workload: each sentence its answer's length + EOS, on both paths alike
    ref = [r for r in engines + generates if r["workload"] == "reference"]
    assert all(r["min_new_tokens"] >= 2 and r["max_new_tokens"] > r["min_new_tokens"] for r in ref)
    assert all(r["engine"]["slots"] == 8 and r["engine"]["prefill_calls"] > 1 for r in engines)


def test_ner_errors_reports_kinds_and_the_dense_records(tmp_path, capsys):
    ner_errors = load("ner_errors")
    names = "".join(f"人{i}" for i in range(10))
    rows = [
        {"input": "文本：罗冰生在上海", "output": "冰生_人名\n上海_地名", "reference": "罗冰生_人名\n上海_地名"},
        {"input": "文本：今天很好", "output": "今天_地名", "reference": "没有"},
        {"input": "文本：" + names, "output": "\n".join(f"人{i}_人名" for i in range(8)),
         "reference": "\n".join(f"人{i}_人名" for i in range(10))},
    ]
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert ner_errors.main([str(path), "--types", "人名,地名,机构名", "--dense", "10", "--examples", "1"]) == 0
    out = capsys.readouterr().out
    # tp 1 + 8, fp 2 (冰生, 今天), fn 1 + 2 (罗冰生, 人8, 人9)
    assert "3 records: P 81.82 R 75.00 F1 78.26 (2 false, 3 missed entities)" in out
    assert "| span too short (inside a reference entity of its type) | 1 |" in out
    assert "| spurious: no reference entity shares a string with it | 1 |" in out
    assert "| missed 人名 | 2 |" in out
    assert ("1 records with >= 10 reference entities hold 10 of 12; they have 2 of the 3 misses and 0 of the 2 "
            "false entities; 0 answered with no entity; their F1 88.89; F1 of the other records 40.00"
            ) in out  # 16/18; 2*1 / (2*1 + 2 + 1)
    assert "output:    '今天_地名'" in out

    train = tmp_path / "train.txt"
    train.write_text(json.dumps({"instruct": "i", "query": "q", "answer": "上海_地名\n人0_人名\n人9_人名"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    assert ner_errors.main([str(path), "--types", "人名,地名,机构名", "--train", str(train)]) == 0
    # seen: 上海 (found), 人0 (found), 人9 (missed); unseen: 罗冰生 and 人1..人8, of which 人1..人7 are found
    assert ("3 of 12 reference entities (25.0%) occur in the training answers: recall 66.67 on those, "
            "77.78 on the 9 unseen ones") in capsys.readouterr().out

    # a list given up on: 没有 for its ten names
    gave_up = rows[:2] + [dict(rows[2], output="没有")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in gave_up), encoding="utf-8")
    assert ner_errors.main([str(path), "--types", "人名,地名,机构名", "--dense", "10"]) == 0
    assert "they have 10 of the 11 misses and 0 of the 2 false entities; 1 answered with no entity;" in (
        capsys.readouterr().out)


def test_ner_errors_counts_outputs_identical_to_another_run(tmp_path, capsys):
    ner_errors = load("ner_errors")
    rows = [{"input": f"文本：句{i}", "output": "没有", "reference": "没有"} for i in range(3)]
    ours, theirs, longer = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ours.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2]), encoding="utf-8")
    other = [dict(rows[0], output="句0_地名"), rows[1], rows[2]]
    theirs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in other), encoding="utf-8")
    assert ner_errors.main([str(ours), "--same_as", str(theirs)]) == 0
    assert f"1 of 2 outputs identical to {theirs}'s" in capsys.readouterr().out
    # other inputs, or another order, are refused
    longer.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[1:]), encoding="utf-8")
    with pytest.raises(SystemExit, match="not predictions of the same inputs"):
        ner_errors.main([str(ours), "--same_as", str(longer)])


def test_ner_errors_refuses_a_file_without_references(tmp_path):
    ner_errors = load("ner_errors")
    path = tmp_path / "pred.jsonl"
    path.write_text(json.dumps({"input": "x", "output": "没有", "reference": None}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"pred.jsonl:1: no reference"):
        ner_errors.main([str(path)])


def test_seed_summary_gives_each_run_and_the_mean_and_spread(tmp_path, capsys):
    seed_summary = load("seed_summary")

    def run(name, dev, plain, grounded=None):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"step": 0, "eval_loss": 3.0}] + [{"step": s, "dev_f1": f} for s, f in dev]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (folder / "test.plain.metrics.json").write_text(json.dumps({"micro": plain}))
        if grounded is not None:
            (folder / "test.grounded.metrics.json").write_text(json.dumps({"micro": {"f1": grounded}}))
            (folder / "dev.plain.metrics.json").write_text(json.dumps({"micro": {"f1": grounded - 0.04}}))
        return str(folder)

    a = run("a", [(300, 0.80), (600, 0.88), (900, 0.86)], {"precision": 0.93, "recall": 0.91, "f1": 0.92}, 0.925)
    b = run("b", [(300, 0.90)], {"precision": 0.91, "recall": 0.89, "f1": 0.90})
    report = tmp_path / "summary.json"
    assert seed_summary.main([a, b, "--json", str(report)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["a"] == ["a", "88.00 (600)", "88.50", "93.00", "91.00", "92.00", "92.50"]  # the best dev, not the last
    assert rows["b"][-1] == ""
    assert rows["runs"] == ["runs", "2", "1", "2", "2", "2", "1"]
    assert rows["mean"] == ["mean", "89.00", "88.50", "92.00", "90.00", "91.00", "92.50"]  # b has no grounded test
    assert rows["sd"] == ["sd", "1.41", "", "1.41", "1.41", "1.41", ""]  # sample sd of 88 and 90; none of one run
    assert json.loads(report.read_text())["summary"]["plain_f1"]["n"] == 2

    with open(os.path.join(b, "metrics.jsonl"), "a") as f:
        f.write('{"step": 12')  # a log cut off mid-write
    with pytest.raises(SystemExit, match=r"metrics.jsonl:3: not JSON"):
        seed_summary.main([b])
    assert seed_summary.main([str(tmp_path / "nothing")]) == 2


def test_ner_vote_keeps_what_most_files_answer(tmp_path, capsys):
    ner_vote = load("ner_vote")
    reference = "张三_人名\n北京_地名"
    outputs = ["张三_人名\n北京_地名", "张三_人名\n京_地名", "张三_人名\n北京_地名\n今天_地名"]
    paths = []
    for i, output in enumerate(outputs):
        path = tmp_path / f"{i}.jsonl"
        rows = [{"input": "文本：张三今天在北京", "output": output, "reference": reference},
                {"input": "文本：下雨", "output": "下雨_地名" if i == 0 else "没有", "reference": "没有"}]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(path))
    voted = tmp_path / "voted.jsonl"
    assert ner_vote.main(paths + ["--types", "人名,地名,机构名", "--out", str(voted)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[paths[1]][1:] == ["50.00", "50.00", "50.00"]
    # 2 of 3 keep 张三 and 北京; 京, 今天 and 下雨 each have one vote
    assert rows["vote, 2 of 3"][1:] == ["100.00", "100.00", "100.00"]
    assert [json.loads(line)["output"] for line in voted.read_text(encoding="utf-8").splitlines()] == [
        "张三_人名\n北京_地名", "没有"]
    assert ner_vote.main(paths + ["--types", "人名,地名,机构名", "--min_votes", "1"]) == 0
    assert table_rows(capsys.readouterr().out)["vote, 1 of 3"][1:] == ["40.00", "100.00", "57.14"]  # 2 of 5 right

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"input": "x", "output": "没有", "reference": "没有"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="not predictions of the same inputs"):
        ner_vote.main(paths[:2] + [str(other)])


def test_dev_f1_speed_times_both_paths_to_the_same_f1(tiny_ner_model_dir, adapter_dir, ner_data_dir, tmp_path):
    dev_f1_speed = load("dev_f1_speed")
    report = tmp_path / "dev.json"
    assert dev_f1_speed.main(["--model", tiny_ner_model_dir, "--adapter", adapter_dir, "--dev",
                              f"{ner_data_dir}/dev.txt", "--samples", "6", "--max_new_tokens", "8",
                              "--device", "cpu", "--json", str(report)]) == 0
    numbers = json.loads(report.read_text())
    assert numbers["records"] == 6
    assert numbers["engine"]["f1"] == numbers["generate"]["f1"]
    assert numbers["speedup"] == round(numbers["generate"]["seconds"] / numbers["engine"]["seconds"], 2)


def test_serve_speed_tiny_measures_every_level_through_the_real_server(tmp_path, capsys):
    serve_speed = load("serve_speed")
    report = tmp_path / "serve.json"
    rc = serve_speed.main(["--tiny", "--workdir", str(tmp_path / "data"), "--json", str(report),
                           "--concurrency", "1,4", "--requests_per_client", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    rows = table_rows(out)
    assert set(rows) == {"file mode (Engine.generate)", "server, 1 clients", "server, 4 clients"}
    assert all(row[-1] == "ok" for row in rows.values()), rows
    data = json.loads(report.read_text())
    assert data["file_mode"]["sentences"] == 8 and data["file_mode"]["sentences_per_s"] > 0
    for clients, level in ((1, data["levels"]["1 clients"]), (4, data["levels"]["4 clients"])):
        # every answer came back with exactly its max_tokens (no stop token): the workload is the file mode's
        assert level["requests"] == level["ok"] == 2 * clients and level["wrong_length"] == 0
        assert 0 < level["p50_s"] <= level["p99_s"] and level["requests_per_s"] > 0


def test_the_serve_bench_percentiles_interpolate():
    serve_speed = load("serve_speed")
    assert serve_speed.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serve_speed.percentile([1.0, 2.0, 3.0], 99) == pytest.approx(2.98)
    assert serve_speed.percentile([5.0], 99) == 5.0


def test_train_speed_nproc_times_the_real_training_on_1_and_n_processes(train_speed, tmp_path, capsys):
    report = tmp_path / "scaling.json"
    launchers = "ddp,deepspeed" if importlib.util.find_spec("deepspeed") else "ddp"
    rc = train_speed.main(["--tiny", "--nproc", "2", "--launchers", launchers, "--workdir", str(tmp_path / "work"),
                           "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    scaling = json.loads(report.read_text())["scaling"]
    assert set(scaling) == {"1", "1-same-batches-as-2", *(f"{n}-2" for n in launchers.split(","))}
    for name, r in scaling.items():
        assert r["steps"] == 2 and r["samples_per_s"] > 0  # the warm-up step left out
        # weak scaling: two processes take twice the samples per step (batch_size 4 each), as
        # does the one process with twice the accumulation
        assert r["samples"] == 2 * 4 * (1 if name == "1" else 2)
        assert r["peak_gib"] is None  # no GPU here
    assert scaling["1"]["speedup"] == 1.0 and "speedup" not in scaling["1-same-batches-as-2"]
    rows = table_rows(out)
    for name in launchers.split(","):
        assert rows[f"{name}-2"][3].endswith("x") and rows["1"][3] == "1.00x"
        # the same global batches: the same per-step losses
        assert scaling[f"{name}-2"]["max_loss_rel_diff"] < 1e-6
        assert rows[f"{name}-2"][6].startswith("max rel. diff")


"""Training on several processes (torchrun, gloo on the CPU): the same training as one process.

The launches are slow next to the other tests (each process imports torch and loads the model),
so the module launches each configuration once (`launched`) and the tests read its outputs.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cnqlora.cli import run_command
from cnqlora.distributed import World, check_launch_plugins, deal
from cnqlora.errors import EchoedError, UserError
from test_training import train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(model_dir, data_dir):
    """42 samples in batches of 4: 11 micro-batches per epoch, the last of 2 samples, and 2 epochs
    of them (22) do not fill the 6 steps of 4 micro-batches: the data ends unevenly."""
    return ["--model_name_or_path", model_dir, "--train_file", f"{data_dir}/train.txt",
            "--dev_file", f"{data_dir}/dev.txt", "--run_name", "run", "--device", "cpu", "--quantization", "4bit",
            "--max_seq_len", "96", "--batch_size", "4", "--max_train_samples", "42", "--num_epochs", "2",
            "--learning_rate", "5e-3", "--lora_dropout", "0", "--logging_steps", "1", "--eval_steps", "3",
            "--save_steps", "2", "--save_total_limit", "3", "--ddp_timeout", "60"]


def launch(nproc, script, args, log_dir, env=None):
    """torchrun with each rank's output in its own files; returns (exit code, launcher output, seconds)."""
    return _launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                      "--redirects", "3", "--log-dir", str(log_dir), script, *args], env)


def accelerate_launch(nproc, script, args):
    """accelerate launch with the README's config (on a machine without GPUs it starts CPU processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _launched([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      "configs/accelerate/ddp.yaml", "--num_processes", str(nproc), "--main_process_port", str(port),
                      script, *args])


def _launched(command, env=None):
    started = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    return done.returncode, done.stdout + done.stderr, time.time() - started


def rank_output(log_dir, rank):
    """What one rank printed (stdout + stderr)."""
    files = sorted(glob.glob(os.path.join(str(log_dir), "**", "attempt_*", str(rank), "std*.log"), recursive=True))
    assert files, f"no output files of rank {rank} under {log_dir}"
    return "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def eval_losses(entries):
    return [(h["step"], h["eval_loss"]) for h in entries if "eval_loss" in h]


def assert_close_losses(got, expected, rel=1e-4):
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (step, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=rel), (step, a, b)


def adapter(run_dir, name="adapter_model"):
    return load_file(os.path.join(run_dir, name, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def launched(tiny_ner_model_dir, ner_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    args = common(tiny_ner_model_dir, ner_data_dir)
    out = {"root": root}
    # One process, 4 micro-batches per step: the reference.
    out["one"] = run_one(args, root / "one", "--gradient_accumulation_steps", "4", "--memory_mode", "fast")
    # Two processes, 2 micro-batches each, activation checkpointing on: the same 4 per step.
    two = ["--gradient_accumulation_steps", "2", "--memory_mode", "lean"]
    out["two"] = launch(2, "baichuan_qlora.py", args + ["--output_dir", str(root / "two"), *two], root / "two-logs")
    # The same run, rank 1 killed with -9 after step 5 (the newest checkpoint is step 4).
    out["killed"] = launch(2, "tests/ddp_worker.py", args + ["--output_dir", str(root / "killed"), *two],
                           root / "killed-logs", env={"DIE_AT": "1:5"})
    out["after_kill"] = sorted(os.listdir(root / "killed" / "run"))
    out["checkpoints_after_kill"] = sorted(os.listdir(root / "killed" / "run" / "checkpoints"))
    shutil.copytree(root / "killed", root / "onto-one")
    # resumed through the other launcher
    out["resumed"] = accelerate_launch(2, "baichuan_qlora.py", args + ["--output_dir", str(root / "killed"), *two,
                                                                       "--resume_from_checkpoint", "auto"])
    # The killed two-process run continued by one process.
    said = []
    out["onto_one"] = run_one(args, root / "onto-one", "--gradient_accumulation_steps", "2", "--memory_mode", "fast",
                              "--resume_from_checkpoint", "auto", log=said.append)
    out["onto_one_said"] = said
    return out


def run_one(args, out_dir, *extra, log=lambda _: None):
    from cnqlora.config import parse_options
    from cnqlora.training import TRAIN_SECTIONS, train

    return train(*parse_options(TRAIN_SECTIONS, args + ["--output_dir", str(out_dir), *extra]), log=log)


def test_two_processes_train_what_one_process_trains(launched):
    code, output, _ = launched["two"]
    assert code == 0, output
    one, two = launched["root"] / "one" / "run", launched["root"] / "two" / "run"
    expected = train_losses(launched["one"]["history"])
    assert len(expected) == 6  # 22 micro-batches in steps of 4: the last step wraps into epoch 3
    assert_close_losses(train_losses(history(two)), expected)
    assert_close_losses(eval_losses(history(two)), eval_losses(launched["one"]["history"]))
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    # the LoRA weights really moved (B starts at zero), so the comparison compares training
    assert max(float(w.abs().max()) for k, w in a.items() if "lora_B" in k) > 1e-2


def test_only_rank_0_writes_and_shows_the_run(launched):
    logs = launched["root"] / "two-logs"
    rank0, rank1 = rank_output(logs, 0), rank_output(logs, 1)
    assert rank0.count("adapter saved to") == 1 and "step 3: dev loss" in rank0 and "training:" in rank0
    for line in ("adapter saved to", "dev loss", "training:", "loaded ", "Loading weights"):
        assert line not in rank1, line
    run_dir = launched["root"] / "two" / "run"
    steps = [h["step"] for h in history(run_dir) if "train_loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once, not once per rank
    assert len(os.listdir(run_dir / "tb")) == 1
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-000002", "step-000004"]
    assert not [n for n in os.listdir(run_dir) if ".tmp-" in n or ".old-" in n]
    state = torch.load(run_dir / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["micro_batches_per_step"] == 4
    assert len(state["rng_ranks"]) == 2
    # each rank's own RNG (seeded apart: different dropout), not two copies of rank 0's
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_a_rank_killed_with_minus_9_ends_every_rank_with_a_message(launched):
    code, output, seconds = launched["killed"]
    assert code != 0
    assert seconds < 200  # not the collective timeout's minutes, nor a hang
    rank0 = rank_output(launched["root"] / "killed-logs", 0)
    assert "lost the other ranks while" in rank0 and "--resume_from_checkpoint auto" in rank0, rank0[-3000:]
    assert "Traceback" not in rank0
    assert "rank" in output and "SIGKILL" in output  # the launcher names the rank that died
    assert "adapter_model" not in launched["after_kill"]
    assert launched["checkpoints_after_kill"] == ["step-000002", "step-000004"]  # whole, none half-written


def test_the_killed_run_resumed_by_accelerate_launch_matches_the_uninterrupted_one(launched):
    code, output, _ = launched["resumed"]
    assert code == 0, output
    assert output.count("resumed from") == 1 and output.count("adapter saved to") == 1  # rank 0 only
    killed, two = launched["root"] / "killed" / "run", launched["root"] / "two" / "run"
    assert_close_losses(train_losses(history(killed)), train_losses(history(two)), rel=1e-6)
    a, b = adapter(two), adapter(killed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_a_two_process_checkpoint_resumed_on_one_process_continues_the_same_run(launched):
    said = launched["onto_one_said"]
    assert any("written by 2 process(es), this run has 1: keeping its 4 micro-batches" in line for line in said), said
    assert any(line.startswith("resumed from") and "at step 4" in line for line in said)
    result = launched["onto_one"]
    assert result["steps"] == 6
    assert_close_losses(train_losses(result["history"]), train_losses(launched["one"]["history"]))


def test_average_seeds_on_two_processes_trains_one_seed_per_process(tiny_ner_model_dir, ner_data_dir, tmp_path):
    from test_seed_average import deltas

    args = common(tiny_ner_model_dir, ner_data_dir) + ["--output_dir", str(tmp_path), "--average_seeds", "1,2",
                                                       "--max_steps", "2", "--eval_steps", "0", "--save_steps", "0"]
    code, output, _ = launch(2, "baichuan_qlora.py", args, tmp_path / "logs")
    assert code == 0, output
    rank0, rank1 = rank_output(tmp_path / "logs", 0), rank_output(tmp_path / "logs", 1)
    assert "seed 1 (1 of 2): training" in rank0 and "seed 2 (2 of 2)" not in rank0
    assert "rank 1: seed 2 (2 of 2): training" in rank1 and "seed 1 (1 of 2)" not in rank1
    run_dir = tmp_path / "run"
    one, two, mean = (deltas(run_dir / "seed-1" / "adapter_model"), deltas(run_dir / "seed-2" / "adapter_model"),
                      deltas(run_dir / "average_adapter"))
    for layer in mean:
        assert not torch.allclose(one[layer], two[layer])
        torch.testing.assert_close(mean[layer], (one[layer] + two[layer]) / 2, rtol=1e-5, atol=1e-7)


def test_a_one_process_checkpoint_resumed_on_two_processes_with_one_micro_batch_per_step(tiny_ner_model_dir,
                                                                                         ner_data_dir, tmp_path):
    """1 -> 2 processes with 1 micro-batch per step: rank 1 has nothing to compute and joins each
    all-reduce with a zero gradient; the run still continues as the one-process run."""
    args = common(tiny_ner_model_dir, ner_data_dir) + ["--gradient_accumulation_steps", "1", "--memory_mode", "fast",
                                                       "--max_steps", "5", "--eval_steps", "0"]
    full = run_one(args, tmp_path / "full")

    class Crash(Exception):
        pass

    def crash(step, **_):
        if step == 3:
            raise Crash

    from cnqlora.config import parse_options
    from cnqlora.training import TRAIN_SECTIONS, train

    with pytest.raises(Crash):
        train(*parse_options(TRAIN_SECTIONS, args + ["--output_dir", str(tmp_path / "cut")]), log=lambda _: None,
              callbacks=[crash])
    code, output, _ = launch(2, "baichuan_qlora.py", args + ["--output_dir", str(tmp_path / "cut"),
                                                            "--resume_from_checkpoint", "auto"], tmp_path / "logs")
    assert code == 0, output
    rank0 = rank_output(tmp_path / "logs", 0)
    assert "written by 1 process(es), this run has 2: keeping its 1 micro-batches" in rank0
    assert_close_losses(train_losses(history(tmp_path / "cut" / "run")), train_losses(full["history"]))
    a, b = adapter(tmp_path / "full" / "run"), adapter(tmp_path / "cut" / "run")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tiny_ner_model_dir, ner_data_dir,
                                                                                      tmp_path):
    args = common(tiny_ner_model_dir, ner_data_dir) + ["--output_dir", str(tmp_path), "--max_steps", "6",
                                                       "--save_steps", "0", "--eval_steps", "0"]
    code, output, _ = launch(2, "tests/ddp_worker.py", args, tmp_path / "logs", env={"TERM_AT": "1:3"})
    assert code != 0
    rank0 = rank_output(tmp_path / "logs", 0)
    # rank 0 got no signal: it stops because rank 1 did, after the same step
    assert "stopped: SIGTERM at step 3 of 6: checkpoint written to" in rank0, rank0[-2000:]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-000003"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["rng_ranks"]) == 2
    assert [h["step"] for h in history(tmp_path / "run") if "train_loss" in h] == [1, 2, 3]


# --------------------------------------------------------------------------- pieces


def test_deal_balances_padded_tokens_and_every_rank_agrees():
    costs = [400, 100, 380, 120, 390, 110, 100, 400]
    hands = deal(costs, 2)
    assert sorted(m for h in hands for m in h) == list(range(8))  # each micro-batch exactly once
    loads = [sum(costs[m] for m in h) for h in hands]
    assert abs(loads[0] - loads[1]) <= 100  # round-robin would give 1270 / 730
    assert all(h == sorted(h) for h in hands)
    assert deal(costs, 2) == hands
    assert deal(costs, 1) == [list(range(8))]  # one process: the plain stream order
    assert deal([5, 5, 5], 2) == [[0, 2], [1]]  # uneven: one micro-batch more on rank 0
    assert deal([7], 3) == [[0], [], []]  # fewer micro-batches than ranks


def test_one_process_is_a_world_of_one_that_never_talks():
    world = World()
    assert world.main and not world.distributed
    assert world.sum([1.5, 2]) == [1.5, 2]
    assert world.gather("x") == ["x"]
    assert world.broadcast(3) == 3
    calls = []
    assert world.main_first(lambda: calls.append(1) or "done") == "done" and calls == [1]


def test_another_ranks_error_is_not_printed_again(capsys):
    def fails(_):
        raise EchoedError("rank 0 said it", 2)

    assert run_command(fails) == 2
    assert capsys.readouterr().err == ""


def test_an_unsupported_accelerate_mode_is_refused_before_any_model(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="FSDP is not supported"):
        check_launch_plugins()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    with pytest.raises(UserError, match="configs/accelerate/ddp.yaml"):
        check_launch_plugins()


def test_the_dev_f1_is_answered_in_shares_and_scored_in_record_order(tiny_ner_model_dir, ner_data_dir, monkeypatch):
    """Rank 0 of 2 answers records 0, 2, 4, ...; the gathered answers must meet their own records."""
    import cnqlora.evaluation as evaluation
    from cnqlora.evaluation import DevNerEvaluator
    from cnqlora.models import load_tokenizer

    records = [json.loads(line) for line in open(f"{ner_data_dir}/dev.txt", encoding="utf-8")][:11]
    tokenizer = load_tokenizer(tiny_ner_model_dir)
    asked = []

    def perfect(model, tok, prompts, gen, **options):
        asked.append(len(prompts))
        return [by_prompt[tuple(p)] for p in prompts]

    class TwoRanks(World):
        def gather(self, value, doing=""):
            # rank 1's share, as the real rank 1 would answer it
            return [value, perfect(None, None, evaluator.prompts[1::2], None)]

    evaluator = DevNerEvaluator(tokenizer, "baichuan", records, world=TwoRanks(rank=0, size=2))
    by_prompt = {tuple(p): r["answer"] for p, r in zip(evaluator.prompts, records)}
    monkeypatch.setattr(evaluation, "answer_many", perfect)
    result = evaluator(torch.nn.Linear(1, 1))
    assert asked == [6, 5]  # this rank answered its 6 of the 11 records only
    assert result["records"] == 11 and result["exact_match"] == 1.0 and result["micro"]["f1"] == 1.0

"""DeepSpeed ZeRO-2 through accelerate on 2 CPU processes (gloo): the same training as one process.

Each configuration is launched once (`ds_launched`) and the tests read its outputs, as in
test_distributed. The checks of the DeepSpeed config need no deepspeed installed.
"""

import os
import shutil
import socket
import sys
import types

import pytest
import torch

from cnqlora.errors import UserError
from cnqlora.zero import check_config, check_installed
from test_distributed import (_launched, adapter, assert_close_losses, common, eval_losses, history, run_one)
from test_training import train_losses

needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (.ci/run installs it: pip install --no-build-isolation deepspeed)")


def deepspeed_launch(script, args, env=None):
    """accelerate launch with the README's ZeRO-2 config, 2 CPU processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _launched([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port",
                      str(port), script, *args], env)


@pytest.fixture(scope="module")
def ds_launched(tiny_ner_model_dir, ner_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    args = common(tiny_ner_model_dir, ner_data_dir)
    two = ["--gradient_accumulation_steps", "2", "--memory_mode", "lean"]
    out = {"root": root}
    out["one"] = run_one(args, root / "one", "--gradient_accumulation_steps", "4", "--memory_mode", "fast")
    out["two"] = deepspeed_launch("baichuan_qlora.py", args + ["--output_dir", str(root / "two"), *two])
    # The finished run taken back to its newest checkpoint (step 4 of 6), resumed under DeepSpeed
    # (the rank-0 message on a dead rank is the same code as DDP's, tested in test_distributed).
    for name in ("cut", "onto-one"):
        shutil.copytree(root / "two", root / name)
        shutil.rmtree(root / name / "run" / "adapter_model")
    out["resumed"] = deepspeed_launch("baichuan_qlora.py", args + ["--output_dir", str(root / "cut"), *two,
                                                                   "--resume_from_checkpoint", "auto"])
    said = []
    out["onto_one"] = run_one(args, root / "onto-one", "--gradient_accumulation_steps", "2", "--memory_mode", "fast",
                              "--resume_from_checkpoint", "auto", log=said.append)
    out["onto_one_said"] = said
    out["nan"] = deepspeed_launch("tests/ddp_worker.py", args + ["--output_dir", str(root / "nan"), *two,
                                                                 "--max_steps", "3", "--eval_steps", "0",
                                                                 "--save_steps", "0"], env={"NAN_AT": "1:2"})
    return out


@needs_deepspeed
def test_deepspeed_zero2_on_two_processes_trains_what_one_process_trains(ds_launched):
    code, output, _ = ds_launched["two"]
    assert code == 0, output[-3000:]
    assert output.count("adapter saved to") == 1  # rank 0 speaks for the run
    one, two = ds_launched["root"] / "one" / "run", ds_launched["root"] / "two" / "run"
    expected = train_losses(ds_launched["one"]["history"])
    assert len(expected) == 6
    assert_close_losses(train_losses(history(two)), expected)
    assert_close_losses(eval_losses(history(two)), eval_losses(ds_launched["one"]["history"]))
    a, b = adapter(one), adapter(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert max(float(w.abs().max()) for k, w in a.items() if "lora_B" in k) > 1e-2


@needs_deepspeed
def test_a_deepspeed_checkpoint_holds_the_whole_adam_state_of_a_plain_run(ds_launched):
    """The moments are gathered from both ranks' partitions into plain AdamW's layout."""
    name = os.path.join("checkpoints", "step-000004", "trainer_state.pt")
    plain = torch.load(ds_launched["root"] / "one" / "run" / name, weights_only=True)["optimizer"]
    zero = torch.load(ds_launched["root"] / "two" / "run" / name, weights_only=True)
    assert zero["world_size"] == 2 and zero["micro_batches_per_step"] == 4
    zero = zero["optimizer"]
    assert zero["param_groups"] == plain["param_groups"]
    assert sorted(zero["state"]) == sorted(plain["state"])
    for i, state in plain["state"].items():
        assert float(zero["state"][i]["step"]) == float(state["step"]) == 4
        for key in ("exp_avg", "exp_avg_sq"):
            assert zero["state"][i][key].shape == state[key].shape
            torch.testing.assert_close(zero["state"][i][key], state[key], rtol=1e-3, atol=1e-8)


@needs_deepspeed
def test_a_deepspeed_run_resumed_under_deepspeed_matches_the_uninterrupted_one(ds_launched):
    code, output, _ = ds_launched["resumed"]
    assert code == 0, output[-3000:]
    assert output.count("resumed from") == 1 and "step-000004 at step 4" in output
    cut, two = ds_launched["root"] / "cut" / "run", ds_launched["root"] / "two" / "run"
    assert_close_losses(train_losses(history(cut)), train_losses(history(two)), rel=1e-6)
    a, b = adapter(two), adapter(cut)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


@needs_deepspeed
def test_a_deepspeed_checkpoint_resumed_on_one_process_continues_the_same_run(ds_launched):
    said = ds_launched["onto_one_said"]
    assert any("written by 2 process(es), this run has 1: keeping its 4 micro-batches" in line for line in said), said
    result = ds_launched["onto_one"]
    assert result["steps"] == 6
    assert_close_losses(train_losses(result["history"]), train_losses(ds_launched["one"]["history"]))


@needs_deepspeed
def test_a_non_finite_gradient_on_one_rank_skips_the_update_on_both(ds_launched):
    import math

    from safetensors.torch import load_file

    code, output, _ = ds_launched["nan"]
    assert code == 0, output[-3000:]
    assert "step 2: gradient norm inf, update skipped (1 so far)" in output
    run_dir = ds_launched["root"] / "nan" / "run"
    logged = [h for h in history(run_dir) if "train_loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3] and logged[-1]["train_skipped_steps"] == 1
    assert math.isfinite(logged[0]["train_grad_norm"]) and "train_grad_norm" not in logged[1]
    weights = load_file(str(run_dir / "adapter_model" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # before the bad step, the same training as one process
    ref = [h for h in ds_launched["one"]["history"] if "train_loss" in h]
    assert logged[0]["train_loss"] == pytest.approx(ref[0]["train_loss"], rel=1e-4)


# --------------------------------------------------------------------------- the config, before any model


ZERO2 = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
         "gradient_accumulation_steps": 1, "fp16": {"enabled": False}, "bf16": {"enabled": False}}


def with_(**changes):
    config = {**ZERO2, "zero_optimization": dict(ZERO2["zero_optimization"])}
    for key, value in changes.items():
        if key in ("stage", "offload_optimizer", "offload_param"):
            config["zero_optimization"][key] = value
        else:
            config[key] = value
    return config


def test_the_shipped_zero2_settings_pass_and_auto_values_are_left_to_the_loop():
    check_config(ZERO2, 1.0, "x.yaml")
    check_config(with_(gradient_accumulation_steps="auto", gradient_clipping="auto"), 0.5, "x.yaml")
    check_config(with_(stage=1, gradient_clipping=0.5), 0.5, "x.yaml")


@pytest.mark.parametrize("changes,message", [
    ({"stage": 3}, "zero_stage 3 is not supported: ZeRO-3 partitions the parameters"),
    ({"stage": 0}, "configs/accelerate/ddp.yaml does that"),
    ({"offload_optimizer": {"device": "cpu"}}, "offload_optimizer to cpu is not supported"),
    ({"offload_param": {"device": "nvme"}}, "offload_param to nvme is not supported"),
    ({"bf16": {"enabled": True}}, "DeepSpeed bf16 .mixed_precision: bf16. is not supported"),
    ({"fp16": {"enabled": True}}, "DeepSpeed fp16"),
    ({"gradient_accumulation_steps": 4}, "--gradient_accumulation_steps 4"),
    ({"gradient_clipping": 0.3}, "gradient_clipping 0.3 but --max_grad_norm 1.0"),
])
def test_deepspeed_settings_the_loop_cannot_honour_are_refused(changes, message):
    with pytest.raises(UserError, match=message) as caught:
        check_config(with_(**changes), 1.0, "my_ds.yaml")
    assert str(caught.value).startswith("my_ds.yaml: ")


def test_a_missing_or_old_deepspeed_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(UserError, match=r"deepspeed is not installed: pip install 'deepspeed>=0.19.1'"):
        check_installed()
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(__version__="0.18.9"))
    with pytest.raises(UserError, match=r"deepspeed 0.18.9 is installed; .* needs 0.19.1 or later"):
        check_installed()
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(__version__="0.19.8+cpu"))
    check_installed()

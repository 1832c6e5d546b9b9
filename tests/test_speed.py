"""The fast training path computes the same thing as plain training, and its choices fall back cleanly."""

import json
import random
import sys
import types

import pytest
import torch

from cnqlora.batching import BatchStream, plan_by_samples, plan_by_tokens
from cnqlora.errors import UserError
from cnqlora import speed
from cnqlora.speed import activation_bytes_per_token, plan_speed, step_context
from cnqlora.training import IGNORE_INDEX, collate, loss_sum


@pytest.fixture(scope="module")
def lora_model_and_samples(tiny_ner_model_dir, ner_data_dir):
    from cnqlora.data import encode_sample
    from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_ner_model_dir)
    torch.manual_seed(0)
    model, _ = attach_lora(load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")),
                           LoraArgs(lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    records = [json.loads(line) for line in open(f"{ner_data_dir}/train.txt", encoding="utf-8")][:6]
    samples = [vars(encode_sample(tokenizer, "baichuan", r, 256)) for r in records]
    assert len({len(s["input_ids"]) for s in samples}) > 1
    return model, samples, tokenizer.pad_token_id


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fast_path_per_sample_losses_and_grads_equal_plain_unpadded_training(lora_model_and_samples):
    """Right padding without an attention mask (the fast path) vs each sample alone, unpadded."""
    model, samples, pad_id = lora_model_and_samples
    model.train()
    alone_losses, alone_grads = [], None
    for sample in samples:
        model.zero_grad()
        loss = loss_sum(model, collate([sample], pad_id), attention_mask=True)
        loss.backward()
        alone_losses.append(loss.item())
        grads = lora_grads(model)
        alone_grads = grads if alone_grads is None else {k: alone_grads[k] + grads[k] for k in grads}

    batch = collate(samples, pad_id)
    assert (batch["attention_mask"] == 0).any()  # padding is really there
    per_sample = []
    for row in range(len(samples)):
        only_row = dict(batch, labels=torch.where(torch.arange(len(samples))[:, None] == row, batch["labels"],
                                                  IGNORE_INDEX))
        with torch.no_grad():
            per_sample.append(loss_sum(model, only_row).item())
    assert per_sample == pytest.approx(alone_losses, rel=1e-5)

    model.zero_grad()
    loss_sum(model, batch).backward()
    fast_grads = lora_grads(model)
    for name, grad in alone_grads.items():
        # float32 sums taken in another order: compare as vectors, not element by element
        assert (fast_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name
    assert sum(g.abs().sum() for g in fast_grads.values()) > 0


def test_the_masked_and_unmasked_batch_agree(lora_model_and_samples):
    model, samples, pad_id = lora_model_and_samples
    batch = collate(samples, pad_id)
    with torch.no_grad():
        assert loss_sum(model, batch, attention_mask=False).item() == pytest.approx(
            loss_sum(model, batch, attention_mask=True).item(), rel=1e-5)


def test_token_batches_respect_the_budget_and_cover_each_sample_once():
    rng = random.Random(0)
    lengths = [rng.randint(40, 300) for _ in range(3000)]
    batches = plan_by_tokens(lengths, 2048, seed=5)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in batches)
    assert plan_by_tokens(lengths, 2048, seed=5) == batches
    assert plan_by_tokens(lengths, 2048, seed=6) != batches

    def padding_share(plan):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
        return 1 - sum(lengths) / padded

    random_plan = plan_by_samples(len(lengths), 16, seed=5)
    assert padding_share(batches) < 0.05 < 0.3 < padding_share(random_plan)
    with pytest.raises(ValueError, match="below the longest sample"):
        plan_by_tokens(lengths, 200, seed=0)


def test_the_batch_stream_crosses_epochs_deterministically():
    lengths = [random.Random(i).randint(10, 90) for i in range(101)]
    for kwargs in ({"batch_size": 8}, {"max_tokens": 400}):
        stream = BatchStream(lengths, seed=3, **kwargs)
        per_epoch = [stream.epoch_size(e) for e in range(3)]
        position = per_epoch[0] + per_epoch[1] + 2
        assert stream.locate(position) == (2, 2)
        assert stream.batch(position) == stream.epoch_plan(2)[2]
        fresh = BatchStream(lengths, seed=3, **kwargs)  # a resumed run recomputes the same batch
        assert fresh.batch(position) == stream.batch(position)
        assert stream.epoch_plan(0) != stream.epoch_plan(1)
        assert stream.total_micro_batches(1.5) == per_epoch[0] + -(-per_epoch[1] // 2)


class _Config:
    hidden_size = 4096
    intermediate_size = 11008
    num_hidden_layers = 32


def test_memory_mode_and_token_budget_follow_the_free_memory():
    cfg = _Config()
    gib = 2 ** 30
    fast = plan_speed("auto", None, "off", cfg, "cuda", torch.bfloat16, 410, free_bytes=120 * gib)
    assert fast.memory_mode == "fast" and fast.max_tokens == 8192 and fast.autocast_dtype == torch.bfloat16
    lean = plan_speed("auto", None, "off", cfg, "cuda", torch.bfloat16, 410, free_bytes=10 * gib)
    assert lean.memory_mode == "lean" and lean.max_tokens == 8192
    tight = plan_speed("auto", None, "off", cfg, "cuda", torch.bfloat16, 410, free_bytes=1 * gib)
    assert tight.memory_mode == "offload" and 410 <= tight.max_tokens < 8192
    assert activation_bytes_per_token(cfg, "fast") > activation_bytes_per_token(cfg, "lean") > \
        activation_bytes_per_token(cfg, "offload")
    forced = plan_speed("lean", 4096, "off", cfg, "cuda", torch.float16, 410, free_bytes=200 * gib)
    assert forced.memory_mode == "lean" and forced.max_tokens == 4096 and forced.autocast_dtype == torch.float16


def test_on_the_cpu_everything_falls_back():
    plan = plan_speed("auto", None, "auto", _Config(), "cpu", torch.float32, 410)
    assert (plan.memory_mode, plan.max_tokens, plan.fused_kernels, plan.autocast_dtype) == ("fast", 0, "off", None)
    assert "liger-kernel not used: no CUDA GPU" in plan.describe()
    with pytest.raises(UserError, match="liger needs a CUDA GPU"):
        plan_speed("auto", None, "liger", _Config(), "cpu", torch.float32, 410)
    with pytest.raises(UserError, match="below the longest sample"):
        plan_speed("auto", 256, "off", _Config(), "cpu", torch.float32, 410)


def test_offload_mode_keeps_saved_tensors_on_the_cpu_and_the_same_gradients(lora_model_and_samples):
    model, samples, pad_id = lora_model_and_samples
    batch = collate(samples[:3], pad_id)
    model.zero_grad()
    loss_sum(model, batch).backward()
    expected = lora_grads(model)
    plan = plan_speed("offload", 0, "off", _Config(), "cpu", torch.float32, 10)
    model.zero_grad()
    with step_context(plan, "cpu"):
        loss = loss_sum(model, batch)
    loss.backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, expected[name])


@pytest.mark.parametrize("extra", [("--memory_mode", "lean"), ("--max_tokens_per_batch", "400")])
def test_lean_and_token_batched_training_runs_resume_exactly(tiny_ner_model_dir, ner_data_dir, tmp_path, extra):
    from test_training import crash_then_resume, run, train_losses

    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a", *extra)
    resumed = crash_then_resume(tiny_ner_model_dir, ner_data_dir, tmp_path / "b", *extra)
    # Exact: the resumed run replays the same batches, RNG states and arithmetic.
    assert train_losses(resumed["history"]) == train_losses(full["history"])


def test_lean_mode_gives_the_losses_of_fast_mode(tiny_ner_model_dir, ner_data_dir, tmp_path):
    from test_training import run, train_losses

    fast = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "fast", "--lora_dropout", "0", "--max_steps", "3")
    lean = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "lean", "--lora_dropout", "0", "--max_steps", "3",
               "--memory_mode", "lean")
    assert [l for _, l in train_losses(lean["history"])] == pytest.approx(
        [l for _, l in train_losses(fast["history"])], rel=1e-4)


def test_lean_mode_really_recomputes_the_blocks(tiny_ner_model_dir, lora_model_and_samples):
    from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model

    _, samples, pad_id = lora_model_and_samples
    model, _ = attach_lora(load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu")), LoraArgs(),
                           gradient_checkpointing=True)
    model.train()
    calls = []
    layer = model.get_base_model().model.layers[0].mlp
    # a pre-hook: the non-reentrant recomputation stops as soon as it has what backward needs,
    # before the module would return, so a forward hook would not see it
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    loss_sum(model, collate(samples[:2], pad_id)).backward()
    assert len(calls) == 2  # once forward, once again in the backward pass


@pytest.fixture
def fake_liger(monkeypatch):
    """Stand-ins for Liger's kernels that compute something else, so a patch shows in the output.

    liger-kernel needs a GPU (Triton); these let the CPU tests see what apply_fused_kernels and
    remove_fused_kernels do to a model and to the process.
    """
    def module(name, **attrs):
        m = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(m, key, value)
        monkeypatch.setitem(sys.modules, name, m)

    rms = types.SimpleNamespace(apply=lambda x, weight, eps, offset, casting, in_place: 2 * x)
    silu_mul = types.SimpleNamespace(apply=lambda a, b: a * b)  # no SiLU

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):  # no rotation
        return q, k

    for name in ("liger_kernel", "liger_kernel.ops", "liger_kernel.transformers"):
        module(name)
    module("liger_kernel.ops.rms_norm", LigerRMSNormFunction=rms)
    module("liger_kernel.ops.swiglu", LigerSiLUMulFunction=silu_mul)
    module("liger_kernel.transformers.rope", liger_rotary_pos_emb=rope)
    # Even if the test fails half-way, no later test may run with the fake RoPE.
    for name in speed._ROPE_MODULES:
        if name in sys.modules and hasattr(sys.modules[name], "apply_rotary_pos_emb"):
            monkeypatch.setattr(sys.modules[name], "apply_rotary_pos_emb", sys.modules[name].apply_rotary_pos_emb)
    monkeypatch.setattr(speed, "_ORIGINAL_ROPE", {})
    return rope


def tiny_baichuan():
    from cnqlora.baichuan import BaichuanConfig, BaichuanForCausalLM

    torch.manual_seed(0)
    config = BaichuanConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172,
                            vocab_size=100)
    return BaichuanForCausalLM(config).eval()


def test_remove_fused_kernels_restores_the_model_and_the_process(fake_liger):
    from cnqlora import baichuan

    model, other = tiny_baichuan(), tiny_baichuan()  # same seed: the same weights
    original_rope = baichuan.apply_rotary_pos_emb
    ids = torch.randint(0, 100, (2, 9))
    fused = 2 * 3 + 1  # per layer two norms and the MLP, then the final norm
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        rope_modules = speed.apply_fused_kernels(model) - fused
        assert rope_modules >= 1 and baichuan.apply_rotary_pos_emb is fake_liger
        speed.apply_fused_kernels(model)  # twice: the fake must not be taken for the original
        assert len([m for m in model.modules() if "forward" in m.__dict__]) == fused
        assert not torch.equal(model(input_ids=ids).logits, plain)
        # The RoPE swap is process-wide: a model nobody patched runs it too.
        assert not torch.equal(other(input_ids=ids).logits, plain)

        assert speed.remove_fused_kernels(model) == fused + rope_modules
        assert baichuan.apply_rotary_pos_emb is original_rope
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert torch.equal(model(input_ids=ids).logits, plain)
        assert torch.equal(other(input_ids=ids).logits, plain)


def test_remove_fused_kernels_leaves_an_unpatched_model_and_foreign_forwards_alone(fake_liger):
    from cnqlora import baichuan

    model = tiny_baichuan()
    original_rope = baichuan.apply_rotary_pos_emb
    ids = torch.randint(0, 100, (2, 9))
    norm = model.model.norm
    own = types.MethodType(lambda self, x: 3 * x, norm)
    norm.forward = own  # not set by apply_fused_kernels: not its to remove
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert speed.remove_fused_kernels(model) == 0
        assert speed.remove_fused_kernels() == 0
        assert norm.__dict__["forward"] is own and baichuan.apply_rotary_pos_emb is original_rope
        assert torch.equal(model(input_ids=ids).logits, before)

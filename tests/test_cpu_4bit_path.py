"""bitsandbytes' AVX512-BF16 CPU path must never reach training, dev evaluation or a checkpoint.

bitsandbytes decides per layer, at construction, whether it may repack a 4-bit weight into its
inference-only CPU format (`support_avx512bf16_for_cpu`, from the CPU's flags). These tests force
that flag on, so they take the path of an AVX512-BF16 CPU whatever CPU runs them.
"""

import bitsandbytes as bnb
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from cnqlora.models import LoraArgs, ModelArgs, attach_lora, keep_4bit_differentiable, load_model

from test_training import crash_then_resume, run, train_losses


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every Linear4bit built from now on believes the CPU has AVX512-BF16."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _quantised_linear():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.02, requires_grad=False, quant_type="nf4",
                                     module=layer).to("cpu")
    return layer


def _packed(module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def test_the_forced_flag_really_takes_the_repacking_path(avx512bf16_cpu):
    # Without this, the other tests here could pass on a CPU where the path never runs.
    layer = _quantised_linear().eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert _packed(layer)


def test_the_guard_unpacks_a_repacked_weight_and_keeps_it_unpacked(avx512bf16_cpu):
    layer = _quantised_linear()
    x = torch.randn(3, 64)
    with torch.no_grad():
        reference = layer(x)  # in train mode: the ordinary 4-bit path
        layer.eval()(x)  # repacks
    assert _packed(layer)
    assert keep_4bit_differentiable(layer) == 1
    assert not _packed(layer)
    with torch.no_grad():
        # Close, not equal: the repacking keeps the block scales in bfloat16, so undoing it is lossy.
        # That is why keep_4bit_differentiable runs at load time, before any repacking can happen.
        torch.testing.assert_close(layer(x), reference, rtol=2e-2, atol=2e-3)
    assert not _packed(layer)


def test_lora_gradients_reach_every_layer_after_an_evaluation(avx512bf16_cpu, tiny_ner_model_dir):
    model = load_model(ModelArgs(model_name_or_path=tiny_ner_model_dir, device="cpu"))
    model, _ = attach_lora(model, LoraArgs(lora_r=4, lora_dropout=0.0))
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])
    model.eval()
    with torch.no_grad():  # the dev evaluation that used to repack every layer
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(_packed(m) for m in layers)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # lora_B starts at zero, so B is where the first step's gradient shows, in every layer.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_resume_is_exact_with_dev_loss_and_dev_f1_on(avx512bf16_cpu, tiny_ner_model_dir, ner_data_dir, tmp_path):
    extra = ("--eval_f1_steps", "2", "--eval_f1_samples", "4", "--eval_max_new_tokens", "8")
    full = run(tiny_ner_model_dir, ner_data_dir, tmp_path / "a", *extra)
    resumed = crash_then_resume(tiny_ner_model_dir, ner_data_dir, tmp_path / "b", *extra, crash_step=4)
    # Exact, not close: the resumed run replays the same batches, RNG and arithmetic.
    assert train_losses(resumed["history"]) == train_losses(full["history"])
    evals = lambda h, key: [(x["step"], x[key]) for x in h if key in x]  # noqa: E731
    assert evals(resumed["history"], "eval_loss") == evals(full["history"], "eval_loss")
    assert evals(resumed["history"], "dev_f1") == evals(full["history"], "dev_f1")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "adapter_model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

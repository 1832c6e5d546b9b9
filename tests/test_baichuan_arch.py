"""Baichuan(2)-7B without remote code: layout, loading, Llama equivalence, 4-bit, tokenizer."""

from __future__ import annotations

import inspect
import json
import os
import shutil

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaForCausalLM,
)

import cnqlora.baichuan as bc
from cnqlora.errors import UserError
from cnqlora.models import keep_4bit_differentiable
from cnqlora.tiny import write_tiny_baichuan

# transformers 5.24 names the KV-cache argument `cache`, 5.17 `past_key_values`.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

# The original config.json files of Baichuan-7B and Baichuan2-7B-Base, verbatim in content.
BAICHUAN_7B_CONFIG = {
    "architectures": ["BaiChuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaiChuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "baichuan",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.29.1",
    "use_cache": True,
    "vocab_size": 64000,
}
BAICHUAN2_7B_CONFIG = {
    "_from_model_config": True,
    "architectures": ["BaichuanForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    },
    "tokenizer_class": "BaichuanTokenizer",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_max_length": 4096,
    "model_type": "baichuan",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.29.2",
    "use_cache": True,
    "vocab_size": 125696,
    "z_loss_weight": 0,
}
BAICHUAN_13B_SHAPE = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "intermediate_size": 13696,
}

TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def load_model(path: str, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def llama_twin(model, *, normalize_head: bool = True, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A stock LlamaForCausalLM carrying `model`'s weights with W_pack split into q/k/v."""
    config = bc.llama_config_from_baichuan(model.config)
    llama = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).float().eval()
    state = model.state_dict()
    if not normalize_head:
        config_dict = model.config.to_dict() | {"norm_head": False}
        state = bc.split_w_pack(state, config_dict)
    else:
        state = bc.split_w_pack(state, model.config)
    result = llama.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return llama


def padded_batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask (left padding is what generation uses)."""
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


SAMPLES = ["今天天气很好 hello world", "北京大学 123", "模型训练数据 the model learns quickly 2024\n实体"]


# --- layout and loading -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_tiny_folder_has_original_layout(variant, tiny_baichuan_dir, tiny_baichuan2_dir):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    assert sorted(os.listdir(path)) == [
        "config.json",
        "generation_config.json",
        "pytorch_model.bin",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    spelled = "BaiChuan" if variant == "baichuan" else "Baichuan"
    assert config["model_type"] == "baichuan"
    assert config["architectures"] == [f"{spelled}ForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_baichuan.{spelled}Config",
        "AutoModelForCausalLM": f"modeling_baichuan.{spelled}ForCausalLM",
    }
    absent = {"num_key_value_heads", "rope_theta", "rope_parameters", "rope_scaling", "norm_head"}
    assert not absent & set(config)
    assert config["vocab_size"] == spm.SentencePieceProcessor(
        model_file=os.path.join(path, "tokenizer.model")
    ).get_piece_size()

    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tok_config = json.load(f)
    assert tok_config["tokenizer_class"] == f"{spelled}Tokenizer"
    assert tok_config["auto_map"] == {"AutoTokenizer": [f"tokenization_baichuan.{spelled}Tokenizer", None]}
    assert tok_config["add_bos_token"] is False and tok_config["add_eos_token"] is False

    state = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    assert type(state) is dict
    hidden = config["hidden_size"]
    for i in range(config["num_hidden_layers"]):
        assert state[f"model.layers.{i}.self_attn.W_pack.weight"].shape == (3 * hidden, hidden)
        assert (f"model.layers.{i}.self_attn.rotary_emb.inv_freq" in state) == (variant == "baichuan")
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for k in state)
    expected_dtype = torch.float32 if variant == "baichuan" else torch.bfloat16
    assert state["lm_head.weight"].dtype == expected_dtype


def _refuse_remote_code(monkeypatch):
    import transformers.models.auto.auto_factory as auto_factory
    import transformers.models.auto.configuration_auto as configuration_auto
    import transformers.models.auto.tokenization_auto as tokenization_auto

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load remote code: {args}")

    for module in (auto_factory, configuration_auto, tokenization_auto):
        monkeypatch.setattr(module, "get_class_from_dynamic_module", refuse)


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_loads_through_auto_classes_without_remote_code(
    variant, tiny_baichuan_dir, tiny_baichuan2_dir, monkeypatch
):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    _refuse_remote_code(monkeypatch)
    bc.register()  # already ran at import; must be harmless to repeat

    config = AutoConfig.from_pretrained(path)
    assert type(config) is bc.BaichuanConfig
    assert config.norm_head is (variant == "baichuan2")
    assert bc.is_baichuan_folder(path)

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(model) is bc.BaichuanForCausalLM
    # The per-layer inv_freq buffers of Baichuan-7B are expected and silently dropped.
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    state = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    loaded = model.state_dict()
    for key, tensor in state.items():
        if key.endswith("inv_freq"):
            continue
        torch.testing.assert_close(loaded[key], tensor.float(), rtol=0, atol=0, msg=key)
    head_type = bc.NormHead if variant == "baichuan2" else torch.nn.Linear
    assert type(model.lm_head) is head_type
    assert model.get_output_embeddings() is model.lm_head

    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, bc.BaichuanTokenizer)
    assert type(tok).__name__ == ("BaiChuanTokenizer" if variant == "baichuan" else "BaichuanTokenizer")
    assert isinstance(bc.load_baichuan_tokenizer(path), bc.BaichuanTokenizer)


def test_is_baichuan_folder_rejects_other_folders(tmp_path):
    assert not bc.is_baichuan_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not bc.is_baichuan_folder(tmp_path)


# --- config -----------------------------------------------------------------------------------


def test_config_reads_original_config_files():
    config = bc.BaichuanConfig(**BAICHUAN_7B_CONFIG)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 64000)
    # The auto_map to remote code is not carried into configs we save.
    assert "auto_map" not in config.to_dict()
    assert config.num_key_value_heads == 32
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.norm_head is False
    assert bc.unsupported_reason(config) is None

    config2 = bc.BaichuanConfig(**BAICHUAN2_7B_CONFIG)
    assert config2.norm_head is True and config2.vocab_size == 125696
    assert config2.dtype == torch.bfloat16
    assert bc.unsupported_reason(config2) is None

    defaults = bc.BaichuanConfig()
    assert (defaults.hidden_size, defaults.intermediate_size, defaults.num_hidden_layers) == (4096, 11008, 32)
    assert defaults.vocab_size == 64000 and defaults.max_position_embeddings == 4096
    assert defaults.rms_norm_eps == 1e-6
    assert (defaults.bos_token_id, defaults.eos_token_id, defaults.pad_token_id) == (1, 2, 0)
    assert defaults.tie_word_embeddings is False and defaults.norm_head is False


def test_norm_head_survives_save_and_reload(tmp_path):
    # Saving rewrites architectures to our class name, which alone would infer a NormHead.
    config = bc.BaichuanConfig(**TINY_SHAPE, vocab_size=300)
    config.architectures = ["BaichuanForCausalLM"]
    config.save_pretrained(tmp_path)
    assert bc.BaichuanConfig.from_pretrained(tmp_path).norm_head is False
    config2 = bc.BaichuanConfig(**TINY_SHAPE, vocab_size=300, architectures=["BaichuanForCausalLM"])
    assert config2.norm_head is True
    config2.architectures = ["BaiChuanForCausalLM"]
    config2.save_pretrained(tmp_path)
    assert bc.BaichuanConfig.from_pretrained(tmp_path).norm_head is True


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_model_save_pretrained_round_trip(variant, tiny_baichuan_dir, tiny_baichuan2_dir, tmp_path):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    model = load_model(path)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == "baichuan" and "auto_map" not in saved
    assert saved["norm_head"] is (variant == "baichuan2")
    reloaded = load_model(str(tmp_path))
    assert type(reloaded.lm_head) is type(model.lm_head)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("base", [BAICHUAN_7B_CONFIG, BAICHUAN2_7B_CONFIG])
def test_13b_alibi_models_are_refused(base):
    raw = base | BAICHUAN_13B_SHAPE
    reason = bc.unsupported_reason(raw)
    assert reason is not None and "ALiBi" in reason
    config = bc.BaichuanConfig(**raw)
    assert bc.unsupported_reason(config) == reason
    with pytest.raises(ValueError, match="ALiBi"):
        bc.BaichuanForCausalLM(bc.BaichuanConfig(**(raw | {"num_hidden_layers": 1})))


@pytest.mark.parametrize("norm_head", [False, True])
def test_random_init_initialises_every_weight(norm_head):
    torch.manual_seed(0)
    config = bc.BaichuanConfig(**TINY_SHAPE, vocab_size=512, norm_head=norm_head)
    # Deterministic mode fills torch.empty with NaN, so a weight that init skipped cannot pass
    # by inheriting a freed, already-random buffer.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model = bc.BaichuanForCausalLM(config)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    names = dict(model.named_parameters())
    assert not any(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for n in names)
    assert type(model.lm_head) is (bc.NormHead if norm_head else torch.nn.Linear)
    for name, param in names.items():
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert 0.015 < param.std().item() < 0.025, name


# --- equivalence with Llama --------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_forward_matches_llama_with_split_w_pack(variant, attn, tiny_baichuan_dir, tiny_baichuan2_dir):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    model = load_model(path, attn_implementation=attn)
    llama = llama_twin(model, attn_implementation=attn)
    tok = bc.load_baichuan_tokenizer(path)
    ids, mask = padded_batch(tok, SAMPLES)
    assert (mask == 0).any()  # the batch really is padded

    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ref = llama(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-5, atol=1e-5)
    # Logits must depend on the weights: a wrong q/k/v order would change them.
    assert ours[keep].std() > 1e-3


def test_norm_head_normalises_rows(tiny_baichuan2_dir):
    model = load_model(tiny_baichuan2_dir)
    head = model.lm_head
    assert isinstance(head, bc.NormHead)
    hidden = torch.randn(2, 3, head.weight.shape[1])
    expected = hidden @ F.normalize(head.weight, dim=-1).T
    torch.testing.assert_close(head(hidden), expected, rtol=1e-6, atol=1e-6)
    # The stored weight is left as loaded (not normalised in place).
    assert not torch.allclose(head.weight.norm(dim=-1), torch.ones(head.weight.shape[0]))
    # Without normalising the head, a Llama twin gives different logits: the NormHead matters.
    tok = bc.load_baichuan_tokenizer(tiny_baichuan2_dir)
    ids, mask = padded_batch(tok, SAMPLES[:1])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        plain = llama_twin(model, normalize_head=False)(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_kv_cache_steps_match_full_forward(variant, tiny_baichuan_dir, tiny_baichuan2_dir):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    model = load_model(path)
    tok = bc.load_baichuan_tokenizer(path)
    ids, mask = padded_batch(tok, SAMPLES)
    prefill = ids.shape[1] - 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True, **{CACHE_KW: cache}
        )
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                use_cache=True,
                **{CACHE_KW: cache},
            )
            steps.append(out.logits)
    assert cache.get_seq_length() == ids.shape[1]
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[keep], full[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_greedy_generate_matches_llama(variant, tiny_baichuan_dir, tiny_baichuan2_dir):
    path = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    model = load_model(path)
    llama = llama_twin(model)
    tok = bc.load_baichuan_tokenizer(path)
    ids, mask = padded_batch(tok, SAMPLES)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ours = model.generate(ids, **kwargs)
        ref = llama.generate(ids, **kwargs)
        no_cache = model.generate(ids, use_cache=False, **kwargs)
    assert ours.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(ours, ref)
    assert torch.equal(ours, no_cache)


def test_plain_llama_export_loads_with_stock_transformers(tiny_baichuan2_dir, tmp_path):
    model = load_model(tiny_baichuan2_dir)
    llama = llama_twin(model)
    llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is LlamaForCausalLM
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# --- training paths ---------------------------------------------------------------------------


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_baichuan2_dir):
    model = load_model(tiny_baichuan2_dir).train()
    tok = bc.load_baichuan_tokenizer(tiny_baichuan2_dir)
    ids, mask = padded_batch(tok, SAMPLES)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    loss, grads = _loss_and_grads(model, ids, mask)
    assert len(grads) == len(list(model.parameters()))
    assert len(calls) == 1

    model.gradient_checkpointing_enable()
    loss_gc, grads_gc = _loss_and_grads(model, ids, mask)
    # Checkpointing really happened: the backward pass re-ran the layer.
    assert len(calls) == 3
    torch.testing.assert_close(loss_gc, loss, rtol=1e-6, atol=1e-6)
    assert grads_gc.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_4bit_nf4_loading_and_lora_on_w_pack(tiny_baichuan2_dir):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_baichuan2_dir, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    # Loaded by hand, so the project's guard against bitsandbytes' inference-only CPU format
    # (cnqlora.models.load_model applies it) is applied by hand too; tests/test_cpu_4bit_path.py
    # checks the guard itself.
    assert keep_4bit_differentiable(model) == 5 * len(model.model.layers)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.W_pack, bnb.nn.Linear4bit)
        assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    head = model.get_output_embeddings()
    assert type(head) is bc.NormHead and head is model.lm_head
    assert type(head.weight) is torch.nn.Parameter and head.weight.dtype == torch.float32

    # In bfloat16 the head follows the other unquantised weights, and still computes.
    bf16 = AutoModelForCausalLM.from_pretrained(
        tiny_baichuan2_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    assert type(bf16.lm_head) is bc.NormHead and bf16.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(bf16(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    full = load_model(tiny_baichuan2_dir)
    tok = bc.load_baichuan_tokenizer(tiny_baichuan2_dir)
    ids, mask = padded_batch(tok, SAMPLES)
    with torch.no_grad():
        q_logits = model(input_ids=ids, attention_mask=mask).logits
        f_logits = full(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(q_logits).all()
    # NF4 is lossy, but the quantised model must still compute the same function roughly.
    corr = torch.corrcoef(torch.stack([q_logits[keep].flatten(), f_logits[keep].flatten()]))[0, 1]
    assert corr > 0.9

    lora = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    lora.train()
    labels = ids.masked_fill(mask == 0, -100)
    loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "W_pack" in n for n in trainable)
    assert len(trainable) == 2 * len(model.model.layers)
    for name, param in trainable.items():
        assert param.grad is not None, name
    # lora_B starts at zero, so it is the one with a non-zero gradient on the first step.
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


# --- weight file layouts ----------------------------------------------------------------------


def test_sharded_and_safetensors_layouts_load_identically(tmp_path, tiny_texts):
    layouts = {"bin": ("bin", 1), "bin3": ("bin", 3), "st": ("safetensors", 1), "st2": ("safetensors", 2)}
    states = {}
    for name, (weights, shards) in layouts.items():
        path = write_tiny_baichuan(
            str(tmp_path / name), tiny_texts, variant="baichuan", weights=weights, shards=shards
        )
        files = sorted(os.listdir(path))
        assert not any(f.endswith(".py") for f in files)
        if shards > 1:
            stem = "pytorch_model" if weights == "bin" else "model"
            shard_files = [f"{stem}-{i:05d}-of-{shards:05d}.{weights}" for i in range(1, shards + 1)]
            index_name = f"{stem}.{weights}.index.json"
            assert set(shard_files) | {index_name} <= set(files)
            with open(os.path.join(path, index_name)) as f:
                assert set(json.load(f)["weight_map"].values()) == set(shard_files)
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )
        assert not info["missing_keys"], name
        states[name] = model.state_dict()
    reference = states.pop("bin")
    for name, state in states.items():
        assert state.keys() == reference.keys()
        for key in reference:
            assert torch.equal(state[key], reference[key]), (name, key)


def test_split_w_pack_rows_and_head_normalisation():
    hidden = 8
    w = torch.arange(3 * hidden * hidden, dtype=torch.float32).reshape(3 * hidden, hidden)
    head = torch.randn(10, hidden) * 3
    state = {
        "model.layers.0.self_attn.W_pack.weight": w,
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2),
        "lm_head.weight": head,
    }
    out = bc.split_w_pack(state, {"hidden_size": hidden, "norm_head": True})
    assert set(out) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "lm_head.weight",
    }
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], w[:hidden])
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], w[hidden : 2 * hidden])
    assert torch.equal(out["model.layers.0.self_attn.v_proj.weight"], w[2 * hidden :])
    torch.testing.assert_close(out["lm_head.weight"].norm(dim=-1), torch.ones(10))
    plain = bc.split_w_pack(state, {"hidden_size": hidden, "norm_head": False})
    assert torch.equal(plain["lm_head.weight"], head)


# --- tokenizer --------------------------------------------------------------------------------

ROUND_TRIP = [
    "今天天气很好",
    "hello world",
    "  two leading spaces and two  inside  ",
    "数字 0123456789 和 3.14",
    "第一行\n第二行\n\n最后",
    "emoji 😀🎉 和罕见字 龘",
    "Mixed 中文 English 混合 text，标点！？",
    "\t tab\r\n",
]


@pytest.fixture(scope="module")
def tok(tiny_baichuan_dir):
    return bc.load_baichuan_tokenizer(tiny_baichuan_dir)


@pytest.fixture(scope="module")
def sp(tiny_baichuan_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_baichuan_dir, "tokenizer.model"))


@pytest.mark.parametrize("text", ROUND_TRIP + SAMPLES)
def test_tokenizer_matches_raw_sentencepiece_and_round_trips(tok, sp, text):
    assert tok.tokenize(text) == sp.encode(text, out_type=str)
    ids = tok(text)["input_ids"]
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tok, sp):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.pad_token == "<unk>"
    assert len(tok) == sp.get_piece_size() == tok.vocab_size
    text = "<s>你好</s>world<unk>"
    ids = tok(text)["input_ids"]
    assert ids == [1] + sp.encode("你好") + [2] + sp.encode("world") + [0]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "你好world"
    # Defaults are the originals': no bos, no eos added.
    assert tok("你好")["input_ids"] == sp.encode("你好")
    batch = tok(["你好", "今天天气很好 hello world 12345 模型训练"], padding=True)
    short = len(sp.encode("你好"))
    assert len(batch["input_ids"][0]) > short
    assert set(batch["input_ids"][0][short:]) == {0} and set(batch["attention_mask"][0][short:]) == {0}


def _copy_with_tokenizer_config(src: str, dst, **updates) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(updates)
    with open(path, "w") as f:
        json.dump(data, f)
    return dst


def test_tokenizer_honours_add_bos_add_eos_flags_and_save(tiny_baichuan_dir, sp, tmp_path):
    body = sp.encode("你好 world")
    both = bc.load_baichuan_tokenizer(
        _copy_with_tokenizer_config(
            tiny_baichuan_dir, tmp_path / "both", add_bos_token=True, add_eos_token=True
        )
    )
    assert both("你好 world")["input_ids"] == [1] + body + [2]
    assert both("你好 world", add_special_tokens=False)["input_ids"] == body
    assert both.get_special_tokens_mask(body) == [1] + [0] * len(body) + [1]
    assert both.decode(both("你好 world")["input_ids"], skip_special_tokens=True) == "你好 world"

    eos_only = bc.load_baichuan_tokenizer(
        _copy_with_tokenizer_config(tiny_baichuan_dir, tmp_path / "eos", add_eos_token=True)
    )
    assert eos_only("你好 world")["input_ids"] == body + [2]

    # Flags and special tokens survive save_pretrained; no auto_map to a missing file is written.
    both.save_pretrained(tmp_path / "saved")
    with open(tmp_path / "saved" / "tokenizer_config.json") as f:
        saved = json.load(f)
    assert saved["add_bos_token"] is True and saved["add_eos_token"] is True
    assert "auto_map" not in saved
    assert os.path.isfile(tmp_path / "saved" / "tokenizer.model")
    again = bc.load_baichuan_tokenizer(tmp_path / "saved")
    assert again("你好 world")["input_ids"] == [1] + body + [2]
    assert again.pad_token_id == 0


def test_tokenizer_loader_handles_class_names_and_missing_config(tiny_baichuan_dir, sp, tmp_path):
    renamed = _copy_with_tokenizer_config(
        tiny_baichuan_dir, tmp_path / "b2", tokenizer_class="BaichuanTokenizer"
    )
    assert type(bc.load_baichuan_tokenizer(renamed)) is bc.BaichuanTokenizer
    assert type(bc.load_baichuan_tokenizer(tiny_baichuan_dir)) is bc.BaiChuanTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(tiny_baichuan_dir, "tokenizer.model"), bare)
    tok = bc.load_baichuan_tokenizer(bare)
    assert tok("今天 hello")["input_ids"] == sp.encode("今天 hello")
    assert tok.pad_token_id == 0 and not tok.add_bos_token and not tok.add_eos_token

    with pytest.raises(UserError, match="tokenizer.model"):
        bc.load_baichuan_tokenizer(tmp_path / "nothing")

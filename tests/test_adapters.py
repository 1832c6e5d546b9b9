"""Adapters from any source (seed peft-0.3 folders, our safetensors ones), their validation, and merging."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from cnqlora.adapters import (
    default_check_prompts,
    MERGE_MARKER,
    TOLERANCES,
    attach_adapter,
    baichuan_tokenizer_json,
    check_merge,
    merge_adapter,
    read_adapter,
    save_baichuan_fast_tokenizer,
)
from cnqlora.baichuan import BaichuanConfig, BaichuanForCausalLM, load_baichuan_tokenizer
from cnqlora.errors import UserError
from cnqlora.models import LoraArgs, ModelArgs, attach_lora, load_model, load_tokenizer

# bitsandbytes (imported with peft, first by this file in a full run) still uses torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

R, ALPHA = 8, 16
IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]])

# The seed project's adapter_config.json, as peft 0.3.0 wrote it.
SEED_CONFIG = {
    "base_model_name_or_path": "baichuan-inc/baichuan-7B",
    "bias": "none",
    "enable_lora": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "lora_alpha": ALPHA,
    "lora_dropout": 0.1,
    "merge_weights": False,
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": R,
    "target_modules": ["W_pack"],
    "task_type": "CAUSAL_LM",
}


def base(path, dtype="float32", quantization="none"):
    return load_model(ModelArgs(model_name_or_path=path, quantization=quantization, compute_dtype=dtype,
                                device="cpu")).eval()


def seed_weights(hidden, layers, seed=0, rank=R, key_infix=""):
    """Old-style keys (no adapter name) with random, clearly non-zero A and B."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}.self_attn.W_pack"
        weights[f"{p}.lora_A{key_infix}.weight"] = torch.randn(rank, hidden, generator=g) * 0.2
        weights[f"{p}.lora_B{key_infix}.weight"] = torch.randn(3 * hidden, rank, generator=g) * 0.2
    return weights


def write_seed_adapter(folder, weights, config=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config or SEED_CONFIG, f)
    torch.save(weights, os.path.join(folder, "adapter_model.bin"))
    return str(folder)


@pytest.fixture(scope="module")
def seed_adapter(tmp_path_factory, tiny_baichuan_dir):
    config = BaichuanConfig.from_pretrained(tiny_baichuan_dir)
    weights = seed_weights(config.hidden_size, config.num_hidden_layers)
    return write_seed_adapter(tmp_path_factory.mktemp("seed_adapter"), weights), weights


@pytest.fixture(scope="module")
def seed_adapter2(tmp_path_factory, tiny_baichuan2_dir):
    config = BaichuanConfig.from_pretrained(tiny_baichuan2_dir)
    weights = seed_weights(config.hidden_size, config.num_hidden_layers, seed=1)
    return write_seed_adapter(tmp_path_factory.mktemp("seed_adapter2"), weights), weights


def hand_merged(path, weights, dtype="float32"):
    """The base with W_pack <- W_pack + (alpha / r) * B @ A, done by hand, no peft."""
    model = base(path, dtype)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            p = f"base_model.model.model.layers.{i}.self_attn.W_pack"
            delta = (ALPHA / R) * weights[f"{p}.lora_B.weight"] @ weights[f"{p}.lora_A.weight"]
            layer.self_attn.W_pack.weight += delta.to(layer.self_attn.W_pack.weight.dtype)
    return model


# --------------------------------------------------------------------------- attaching


def test_seed_adapter_loads_with_the_files_values_and_lora_math(tiny_baichuan_dir, seed_adapter):
    folder, weights = seed_adapter
    messages = []
    model = attach_adapter(base(tiny_baichuan_dir), folder, log=messages.append)
    assert not model.training
    params = dict(model.named_parameters())
    for key, value in weights.items():
        name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        assert torch.equal(params[name], value), key
        assert not params[name].requires_grad
    # Old keys are dropped with a note naming them, not refused.
    assert any("enable_lora" in m and "merge_weights" in m for m in messages)
    assert "enable_lora" in " ".join(model.cnqlora_notes)

    # One layer by hand: W_pack(x) = W x + (alpha / r) B A x.
    seen = {}
    w_pack = model.base_model.model.model.layers[0].self_attn.W_pack
    handle = w_pack.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    handle.remove()
    p = "base_model.model.model.layers.0.self_attn.W_pack"
    a, b = weights[f"{p}.lora_A.weight"], weights[f"{p}.lora_B.weight"]
    x = seen["x"]
    manual = x @ w_pack.base_layer.weight.T + (ALPHA / R) * (x @ a.T) @ b.T
    torch.testing.assert_close(seen["y"], manual, rtol=1e-5, atol=1e-5)

    # The whole network: same as the base with every W_pack merged by hand.
    with torch.no_grad():
        expected = hand_merged(tiny_baichuan_dir, weights)(input_ids=IDS).logits
        bare = base(tiny_baichuan_dir)(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - bare).abs().max() > 0.1


def test_keys_with_the_adapter_name_inside_and_trainable_mode(tiny_baichuan_dir, tmp_path):
    config = BaichuanConfig.from_pretrained(tiny_baichuan_dir)
    weights = seed_weights(config.hidden_size, config.num_hidden_layers, key_infix=".default")
    folder = write_seed_adapter(tmp_path / "named", weights)
    model = attach_adapter(base(tiny_baichuan_dir), folder, is_trainable=True, log=lambda _: None)
    assert model.training
    params = dict(model.named_parameters())
    for key, value in weights.items():
        assert torch.equal(params[key], value) and params[key].requires_grad


def test_our_safetensors_adapter_loads_on_16_and_4_bit_bases(tiny_baichuan_dir, tmp_path):
    from cnqlora.training import save_adapter

    torch.manual_seed(0)
    trained, _ = attach_lora(base(tiny_baichuan_dir), LoraArgs())
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    folder = save_adapter(trained, load_tokenizer(tiny_baichuan_dir), str(tmp_path / "adapter_model"), "x: 1\n")
    assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))

    loaded = attach_adapter(base(tiny_baichuan_dir), folder, log=lambda _: None)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)

    quantized = attach_adapter(base(tiny_baichuan_dir, quantization="4bit"), folder, log=lambda _: None)
    assert type(quantized.base_model.model.model.layers[0].self_attn.W_pack.base_layer).__name__ == "Linear4bit"
    file_values = read_adapter(folder).weights
    params = dict(quantized.named_parameters())
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(params[key.replace("lora_B.", "lora_B.default.")].float(), file_values[key])
    eight = attach_adapter(base(tiny_baichuan_dir, quantization="8bit"), folder, log=lambda _: None)
    assert type(eight.base_model.model.model.layers[0].self_attn.W_pack.base_layer).__name__ == "Linear8bitLt"
    assert torch.equal(dict(eight.named_parameters())[key.replace("lora_B.", "lora_B.default.")].float(),
                       file_values[key])
    with torch.no_grad():
        out4 = quantized(input_ids=IDS).logits
    # NF4 rounding moves logits a little; the adapter's effect is far larger.
    assert (out4 - expected).abs().max() < 0.5 * (expected - base(tiny_baichuan_dir)(input_ids=IDS).logits).abs().max()


class _Evil:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _bad(tmp_path, name, weights=None, config=None, files=None):
    folder = tmp_path / name
    folder.mkdir()
    if config is not None:
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        torch.save(weights, folder / "adapter_model.bin")
    for file_name, data in (files or {}).items():
        (folder / file_name).write_bytes(data)
    return str(folder)


def test_every_bad_adapter_gives_one_clear_message(tiny_baichuan_dir, tmp_path):
    hidden, layers = 64, 2
    good = seed_weights(hidden, layers)
    model = base(tiny_baichuan_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def error(path):
        with pytest.raises(UserError) as info:
            attach_adapter(model, path, log=lambda _: None)
        return str(info.value)

    assert "adapter folder not found" in error(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="adapter folder not found"):
        read_adapter(str(tmp_path / "nowhere"))
    assert "no adapter_config.json" in error(_bad(tmp_path, "empty"))
    run = tmp_path / "run"  # a training run folder instead of its adapter_model/ inside
    write_seed_adapter(run / "adapter_model", good)
    assert f"the adapter is {run / 'adapter_model'}" in error(str(run))
    assert "no weights" in error(_bad(tmp_path, "noweights", config=SEED_CONFIG))
    assert "cannot be read as JSON" in error(_bad(tmp_path, "badjson", good, "{oops"))
    assert "not 'LORA'" in error(_bad(tmp_path, "ia3", good, {**SEED_CONFIG, "peft_type": "IA3"}))
    assert "MergedLinear" in error(_bad(tmp_path, "merged", good, {**SEED_CONFIG, "enable_lora": [True, False, True]}))

    # An adapter for LLaMA-style q_proj/v_proj on Baichuan.
    qv = {f"base_model.model.model.layers.0.self_attn.{m}.lora_{ab}.weight": torch.zeros(4, 4)
          for m in ("q_proj", "v_proj") for ab in "AB"}
    message = error(_bad(tmp_path, "qv", qv, {**SEED_CONFIG, "target_modules": ["q_proj", "v_proj"]}))
    assert "q_proj, v_proj" in message and "W_pack" in message and "does not have" in message

    # Trained on a model of another hidden size: the message names a key and both shapes.
    small = BaichuanForCausalLM(BaichuanConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4))
    other, _ = attach_lora(small, LoraArgs(lora_target=["W_pack"]))
    other.save_pretrained(tmp_path / "small")
    message = error(str(tmp_path / "small"))
    assert "W_pack.lora_A.weight has shape (8, 32)" in message and "(8, 64)" in message
    assert "another size" in message

    # The file's rank disagrees with its config.
    message = error(_bad(tmp_path, "rank", seed_weights(hidden, layers, rank=4), SEED_CONFIG))
    assert "differs from r=8" in message

    # Keys for layers this model does not have / layers of the model the file does not cover.
    deeper = seed_weights(hidden, layers + 1)
    message = error(_bad(tmp_path, "deeper", deeper, SEED_CONFIG))
    assert "belong to no layer" in message and "layers.2" in message and "2 layers" in message
    shallower = {k: v for k, v in good.items() if ".layers.0." in k}
    assert "has no weights for 2 adapter parameter(s)" in error(_bad(tmp_path, "shallow", shallower, SEED_CONFIG))
    stray = {**good, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, 64)}
    assert "matches no adapter parameter" in error(_bad(tmp_path, "stray", stray, SEED_CONFIG))

    # A pickle that would run code is refused, and the code does not run.
    canary = tmp_path / "pwned"
    message = error(_bad(tmp_path, "evil", {"x": _Evil(str(canary))}, SEED_CONFIG))
    assert "refused to load" in message and "arbitrary code" in message
    assert not canary.exists()
    assert "not a readable safetensors" in error(
        _bad(tmp_path, "damaged", config=SEED_CONFIG, files={"adapter_model.safetensors": b"\x00garbage"}))
    assert "not a named tensor" in error(_bad(tmp_path, "notensor", {"a": [1, 2]}, SEED_CONFIG))

    # None of this touched the base model.
    assert not any(n for n, _ in model.named_modules() if "lora" in n)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    # ...and the good adapter still attaches to it afterwards.
    attach_adapter(model, write_seed_adapter(tmp_path / "good", good), log=lambda _: None)


# --------------------------------------------------------------------------- tokenizer.json

TOKENIZER_STRINGS = [
    "", " ", "   ", "今天天气很好", "hello world", " leading", "trailing ", "  two  inside  ",
    "数字 0123456789 和 3.14", "第一行\n第二行\n\n最后\n", "\n", "\t tab\r\n", "emoji 😀🎉 和罕见字 龘 𠀀 ąčę",
    "<s>", "</s>", "<unk>", "<s>你好</s>world<unk>", "a <s> b </s> c", "x</s>y", "<s", "s>", "▁", "▁▁ a▁b",
    "Human: \n找出人名\n王小明在北京\n\nAssistant: \n", "Mixed 中文 English 混合 text，标点！？",
]


def _many_strings(texts):
    rng = random.Random(0)
    pool = sorted(set("".join(texts))) + list(" \n\t😀龘éß<>/s▁")
    random_strings = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    return TOKENIZER_STRINGS + texts[:200] + random_strings


@pytest.mark.parametrize("variant", ["baichuan", "baichuan2"])
def test_tokenizer_json_matches_baichuan_tokenizer(variant, tiny_baichuan_dir, tiny_baichuan2_dir, tiny_texts,
                                                   tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_baichuan_dir if variant == "baichuan" else tiny_baichuan2_dir
    slow = load_baichuan_tokenizer(folder)
    save_baichuan_fast_tokenizer(slow, os.path.join(folder, "tokenizer.model"), str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    assert (tmp_path / "tokenizer.model").read_bytes() == open(os.path.join(folder, "tokenizer.model"), "rb").read()
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (0, 1, 2, 0)
    assert len(fast) == len(slow)

    strings = _many_strings(tiny_texts)
    byte_fallback_seen = False
    for text in strings:
        ids = slow(text)["input_ids"]
        assert fast(text)["input_ids"] == ids, text
        byte_fallback_seen |= any(t.startswith("<0x") for t in slow.convert_ids_to_tokens(ids))
        for skip in (False, True):
            assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(ids, skip_special_tokens=skip), text
    assert byte_fallback_seen
    # Arbitrary id sequences (a model's output) decode alike too, except runs of byte pieces
    # that are not valid UTF-8 - encoding never produces those (see the report).
    rng = random.Random(1)
    ordinary = [i for i in range(len(slow)) if not slow.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(300):
        ids = [rng.choice(ordinary) for _ in range(rng.randint(1, 12))]
        assert fast.decode(ids) == slow.decode(ids), ids
    # The raw tokenizers object (no transformers wrapper) agrees as well.
    raw = baichuan_tokenizer_json(os.path.join(folder, "tokenizer.model"))
    assert raw.encode("今天 hello  world\n😀", add_special_tokens=False).ids == slow("今天 hello  world\n😀")["input_ids"]


def test_tokenizer_conversion_refuses_unsupported_models(tmp_path, tiny_texts):
    import sentencepiece as spm

    path = str(tmp_path / "dummy.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tiny_texts), model_prefix=path[:-6], vocab_size=600, hard_vocab_limit=False,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    with pytest.raises(UserError, match="add_dummy_prefix"):
        baichuan_tokenizer_json(path)


# --------------------------------------------------------------------------- merging

# The stock loader, in a process that cannot import cnqlora: the merged folder must stand alone.
_STOCK_SCRIPT = r"""
import json, sys
sys.modules["cnqlora"] = None  # any import of cnqlora now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for folder in sys.argv[1:-1]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(json.loads(sys.argv[-1]))).logits
    out[folder] = {"model": type(model).__name__, "tokenizer": type(tok).__name__, "logits": logits.tolist(),
                   "ids": tok("<s>你好 world  今天\n😀")["input_ids"], "decoded": tok.decode(tok("a  b\n龘")["input_ids"]),
                   "has_cnqlora": any(m.startswith("cnqlora") and sys.modules[m] for m in sys.modules)}
print(json.dumps(out))
"""


def _stock_load(folders, ids, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _STOCK_SCRIPT, *folders, json.dumps(ids.tolist())],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_logits(base_path, adapter, dtype="float32"):
    model = attach_adapter(base(base_path, dtype), adapter, log=lambda _: None)
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.fixture(scope="module")
def merged_pair(tmp_path_factory, tiny_baichuan_dir, tiny_baichuan2_dir, seed_adapter, seed_adapter2):
    """Float32 merges of the seed adapters into tiny Baichuan and Baichuan2, with their logs."""
    root = tmp_path_factory.mktemp("merged")
    logs = {"baichuan": [], "baichuan2": []}
    one = merge_adapter(tiny_baichuan_dir, seed_adapter[0], str(root / "b1"), dtype="float32",
                        log=logs["baichuan"].append)
    two = merge_adapter(tiny_baichuan2_dir, seed_adapter2[0], str(root / "b2"), dtype="float32",
                        log=logs["baichuan2"].append)
    return one, two, logs


def test_float32_merges_are_exact_and_load_with_stock_transformers(merged_pair, tiny_baichuan_dir,
                                                                   tiny_baichuan2_dir, seed_adapter, seed_adapter2,
                                                                   tmp_path):
    one, two, logs = merged_pair
    for folder in (one, two):
        names = set(os.listdir(folder))
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", MERGE_MARKER} <= names
        assert not {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} & names
        config = json.loads(open(os.path.join(folder, "config.json")).read())
        assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
        assert "auto_map" not in config and config["use_cache"] is True
        check = json.loads(open(os.path.join(folder, MERGE_MARKER)).read())["check"]
        assert check["ok"] and check["greedy_agree"] == check["prompts"] == 2 and check["teacher_forced_flips"] == 0
        assert check["max_abs_logit_diff"] <= 1e-4 and check["tokenizer_agrees"]
    assert any("merge check passed" in m for m in logs["baichuan"])
    assert any("NormHead folded" in m for m in logs["baichuan2"])

    stock = _stock_load([one, two], IDS, tmp_path)
    for folder, base_path, (adapter, weights) in ((one, tiny_baichuan_dir, seed_adapter),
                                                   (two, tiny_baichuan2_dir, seed_adapter2)):
        got = stock[folder]
        assert got["model"] == "LlamaForCausalLM" and not got["has_cnqlora"]
        assert got["tokenizer"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
        expected = _reference_logits(base_path, adapter)
        torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=1e-5, atol=1e-5)
        by_hand = hand_merged(base_path, weights)
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(got["logits"]), by_hand(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        ref_tok = load_baichuan_tokenizer(base_path)
        assert got["ids"] == ref_tok("<s>你好 world  今天\n😀")["input_ids"]
        assert got["decoded"] == "a  b\n龘"


def test_bfloat16_merge_agrees_within_the_tolerance(tiny_baichuan_dir, seed_adapter, tmp_path):
    from safetensors import safe_open

    messages = []
    out = merge_adapter(tiny_baichuan_dir, seed_adapter[0], str(tmp_path / "bf16"), log=messages.append)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    check = json.loads(open(os.path.join(out, MERGE_MARKER)).read())["check"]
    assert check["ok"] and check["dtype"] == "bfloat16" and check["relative_tolerance"] == TOLERANCES["bfloat16"]
    assert 0 < check["max_abs_logit_diff"] <= check["tolerance"] < check["adapter_effect"]
    # Independently of merge_adapter's own check: the stored model against base + adapter in float32.
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    expected = _reference_logits(tiny_baichuan_dir, seed_adapter[0])
    assert (got - expected).abs().max() <= TOLERANCES["bfloat16"] * max(1.0, expected.abs().max())
    # Greedy choices may flip only at near ties; on this model and input there is at most one.
    assert (got[0].argmax(-1) != expected[0].argmax(-1)).sum() <= 1


def test_check_merge_on_its_own(merged_pair, tiny_baichuan_dir, seed_adapter, tiny_baichuan2_dir):
    one, two, _ = merged_pair
    prompts = ["今天天气很好", "Human: \nhello world\n\nAssistant: \n", "数字 123"]
    result = check_merge(tiny_baichuan_dir, seed_adapter[0], one, prompts, max_new_tokens=6)
    assert result["ok"] and result["prompts"] == 3 and result["greedy_agree"] == 3
    assert result["max_abs_logit_diff"] < 1e-4 and result["adapter_effect"] > 0.1
    assert all(len(d["merged"]) == 6 for d in result["details"])
    # Against the wrong merged folder (Baichuan2's) the check fails.
    wrong = check_merge(tiny_baichuan_dir, seed_adapter[0], two, prompts, max_new_tokens=6)
    assert not wrong["ok"]


def test_a_broken_merge_is_detected_and_nothing_is_written(tiny_baichuan_dir, seed_adapter, tmp_path, monkeypatch):
    import cnqlora.baichuan as bc

    real = bc.split_w_pack

    def swap_k_and_v(state, config):
        out = real(state, config)
        for key in [k for k in out if k.endswith("k_proj.weight")]:
            v = key.replace("k_proj", "v_proj")
            out[key], out[v] = out[v], out[key]
        return out

    monkeypatch.setattr(bc, "split_w_pack", swap_k_and_v)
    dest = tmp_path / "broken"
    with pytest.raises(UserError, match="does not reproduce base \\+ adapter"):
        merge_adapter(tiny_baichuan_dir, seed_adapter[0], str(dest), dtype="float32", log=lambda _: None)
    assert not dest.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("broken")]


def test_refuses_to_overwrite_but_replaces_a_previous_merge(tiny_baichuan_dir, seed_adapter, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        merge_adapter(tiny_baichuan_dir, seed_adapter[0], str(occupied), dtype="float32", log=lambda _: None)
    assert os.listdir(occupied) == ["notes.txt"]

    out = str(tmp_path / "merged")
    merge_adapter(tiny_baichuan_dir, seed_adapter[0], out, dtype="float32", log=lambda _: None)
    (tmp_path / "merged" / "stale.txt").write_text("from the old merge")
    messages = []
    merge_adapter(tiny_baichuan_dir, seed_adapter[0], out, dtype="float32", log=messages.append)
    assert any("replaced the previous merge" in m for m in messages)
    assert not os.path.exists(os.path.join(out, "stale.txt"))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]
    with pytest.raises(UserError, match="dtype"):
        merge_adapter(tiny_baichuan_dir, seed_adapter[0], str(tmp_path / "x"), dtype="int4", log=lambda _: None)


def test_llama_base_merges_with_save_pretrained(merged_pair, tiny_baichuan_dir, tmp_path):
    """A plain LLaMA base (the merged Baichuan folder) + a q_proj/v_proj adapter written by current peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    llama_dir = merged_pair[0]
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = str(tmp_path / "qv_adapter")
    peft_model.save_pretrained(adapter)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits

    # That adapter does not fit Baichuan, and says why.
    with pytest.raises(UserError, match="W_pack"):
        attach_adapter(base(tiny_baichuan_dir), adapter, log=lambda _: None)

    out = merge_adapter(llama_dir, adapter, str(tmp_path / "llama_merged"), dtype="float32", log=lambda _: None)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_default_check_prompts_are_the_adapters_training_prompts(tiny_baichuan_dir, tmp_path):
    from cnqlora.data import encode_prompt

    tokenizer = load_tokenizer(tiny_baichuan_dir)
    data = tmp_path / "dev.txt"
    data.write_text(json.dumps({"instruct": "找出人名", "query": "文本：王小明在北京", "answer": "王小明_人名"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "train_config.yaml").write_text(f"template: alpaca\ndev_file: {data}\n", encoding="utf-8")
    prompts = default_check_prompts(str(adapter), tokenizer, "baichuan")
    assert prompts[0] == ("找出人名\n文本：王小明在北京", encode_prompt(tokenizer, "alpaca", "找出人名", "文本：王小明在北京").ids)
    # the second falls back to a generic prompt, in the same template
    assert prompts[1][1] == encode_prompt(tokenizer, "alpaca", *prompts[1][0].split("\n", 1)).ids
    # no train_config.yaml: the model type's template (the seed's for Baichuan)
    (adapter / "train_config.yaml").unlink()
    text, ids = default_check_prompts(str(adapter), tokenizer, "baichuan", n=1)[0]
    assert ids == encode_prompt(tokenizer, "baichuan", *text.split("\n", 1)).ids


# --------------------------------------------------------------------------- averaging


def _trained_adapter(base_dir, dest, seed, r, alpha, rslora=False, targets=("all-linear",)):
    """An adapter as training saves it, with random non-zero B (a trained one's B is not zero)."""
    from cnqlora.training import save_adapter

    torch.manual_seed(seed)
    model, _ = attach_lora(base(base_dir), LoraArgs(lora_r=r, lora_alpha=alpha, lora_target=list(targets)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    folder = save_adapter(model, load_tokenizer(base_dir), str(dest), "x: 1\n")
    if rslora:  # the same weights read with rsLoRA's scale alpha / sqrt(r)
        config_file = os.path.join(folder, "adapter_config.json")
        with open(config_file) as f:
            config = json.load(f)
        with open(config_file, "w") as f:
            json.dump(dict(config, use_rslora=True), f)
    return folder


def _merged_weights(base_dir, adapter):
    return attach_adapter(base(base_dir), adapter, log=lambda _: None).merge_and_unload().state_dict()


def test_an_averaged_adapter_is_the_mean_of_the_models(tiny_baichuan_dir, tmp_path):
    from cnqlora.adapters import AVERAGE_MARKER, average_adapters

    folders = [_trained_adapter(tiny_baichuan_dir, tmp_path / "a", 0, 4, 8),
               _trained_adapter(tiny_baichuan_dir, tmp_path / "b", 1, 8, 8),
               _trained_adapter(tiny_baichuan_dir, tmp_path / "c", 2, 4, 16, rslora=True)]
    out = str(tmp_path / "soup")
    messages = []
    average_adapters(folders, out, log=messages.append)
    assert "the mean of 3 adapters as one of rank 16" in messages[-1]

    # The reference needs no averaging code: the mean of the three merged models' weights.
    merged = [_merged_weights(tiny_baichuan_dir, f) for f in folders]
    mean_state = {k: sum(m[k] for m in merged) / len(merged) for k in merged[0]}
    reference = base(tiny_baichuan_dir)
    reference.load_state_dict(mean_state)
    soup = attach_adapter(base(tiny_baichuan_dir), out, log=lambda _: None)
    single = attach_adapter(base(tiny_baichuan_dir), folders[0], log=lambda _: None)
    with torch.no_grad():
        expected, got = reference(input_ids=IDS).logits, soup(input_ids=IDS).logits
        first = single(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - first).abs().max() > 0.05  # not just one of the inputs

    config = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 16, False)
    # predict.py reads the tokenizer (and its EOS) and the training config from the adapter folder
    assert {"tokenizer_config.json", "train_config.yaml", AVERAGE_MARKER} <= set(os.listdir(out))
    # loads on a 4-bit base like any adapter
    attach_adapter(base(tiny_baichuan_dir, quantization="4bit"), out, log=lambda _: None)


def test_averaging_refuses_what_it_cannot_average(tiny_baichuan_dir, tmp_path, capsys):
    from cnqlora.adapters import average_adapters

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import predict

    a = _trained_adapter(tiny_baichuan_dir, tmp_path / "a", 0, 4, 8)
    b = _trained_adapter(tiny_baichuan_dir, tmp_path / "b", 1, 4, 8)
    attention_only = _trained_adapter(tiny_baichuan_dir, tmp_path / "w", 2, 4, 8, targets=("W_pack",))
    quiet = {"log": lambda _: None}
    with pytest.raises(UserError, match="at least two"):
        average_adapters([a], str(tmp_path / "x"), **quiet)
    with pytest.raises(UserError, match="does not adapt the same layers"):
        average_adapters([a, attention_only], str(tmp_path / "x"), **quiet)
    with pytest.raises(UserError, match="is one of the adapters"):
        average_adapters([a, b], a, **quiet)
    tokenizer_config = os.path.join(b, "tokenizer_config.json")
    saved = open(tokenizer_config).read()
    with open(tokenizer_config, "w") as f:
        json.dump(dict(json.loads(saved), eos_token="<unk>"), f)
    with pytest.raises(UserError, match="different EOS tokens"):
        average_adapters([a, b], str(tmp_path / "x"), **quiet)
    with open(tokenizer_config, "w") as f:
        f.write(saved)
    config_file = os.path.join(b, "adapter_config.json")
    saved = open(config_file).read()
    for change, message in (({"use_dora": True}, "DoRA"), ({"rank_pattern": {"W_pack": 2}}, "rank_pattern")):
        with open(config_file, "w") as f:
            json.dump(dict(json.loads(saved), **change), f)
        with pytest.raises(UserError, match=message):
            average_adapters([a, b], str(tmp_path / "x"), **quiet)
    with open(config_file, "w") as f:
        f.write(saved)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a previous average"):
        average_adapters([a, b], str(occupied), **quiet)
    assert not (tmp_path / "x").exists() and os.listdir(occupied) == ["notes.txt"]

    # a training checkpoint (no tokenizer beside it) averages with a saved adapter, whose tokenizer goes along
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (checkpoint / name).write_bytes(open(os.path.join(a, name), "rb").read())
    average_adapters([str(checkpoint), b], str(tmp_path / "with_checkpoint"), **quiet)
    assert "tokenizer_config.json" in os.listdir(tmp_path / "with_checkpoint")

    # the command line: both flags or neither; a previous average is replaced
    assert predict.run_command(predict.main, ["--average_adapters", f"{a},{b}"]) == 2
    assert "go together" in capsys.readouterr().err
    assert predict.run_command(predict.main, ["--average_adapters", f"{a},{b}", "--average_to", "x",
                                              "--merge_to", "y"]) == 2
    assert "only writes the averaged adapter" in capsys.readouterr().err
    out = str(tmp_path / "soup")
    for _ in range(2):
        assert predict.run_command(predict.main, ["--average_adapters", f"{a},{b}", "--average_to", out]) == 0
    assert "replaced the previous average" in capsys.readouterr().out

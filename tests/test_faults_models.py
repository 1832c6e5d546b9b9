"""Broken model folders: truncated safetensors, pickled code in pytorch_model.bin, a tokenizer that
needs the folder's own Python code, and impossible sizes in config.json. Each is one `error:` line
(exit status 2), and each is caught before any weights are loaded where that can be done cheaply."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import struct

import pytest
import torch

import test_baichuan
from cnqlora.cli import run_command
from cnqlora.errors import UserError
from cnqlora.models import (
    ModelArgs,
    _config_sizes,
    _min_parameters,
    check_model_folder,
    implausible_config_sizes,
    load_model,
    load_tokenizer,
)
from cnqlora.tiny import write_tiny_baichuan


def error_line(argv, capsys):
    """The whole stderr of a test_baichuan.py run that must fail with exit status 2: one `error:` line."""
    assert run_command(test_baichuan.main, argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def cli(folder: str) -> list[str]:
    return ["--model_name_or_path", folder, "--quantization", "none", "--device", "cpu", "--max_new_tokens", "2"]


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if transformers starts loading a model."""
    from transformers import AutoModelForCausalLM

    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def skip_folder_check(monkeypatch):
    """Let load_model go straight to transformers, to test what it makes of errors raised there."""
    monkeypatch.setattr("cnqlora.models.check_model_folder", lambda *_, **__: {})


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*_, **__):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_texts):
    """Tiny Baichuan folders in several weight layouts, never modified: tests work on copies."""
    root = tmp_path_factory.mktemp("pristine")
    layouts = {"safetensors": dict(weights="safetensors"), "safetensors3": dict(weights="safetensors", shards=3),
               "bin": dict(weights="bin"), "bin2": dict(weights="bin", shards=2)}
    return {name: write_tiny_baichuan(str(root / name), tiny_texts, **kw) for name, kw in layouts.items()}


@pytest.fixture
def folder(pristine, tmp_path):
    def copy(layout: str) -> str:
        return shutil.copytree(pristine[layout], str(tmp_path / layout))

    return copy


def header_length(path: str) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


# --------------------------------------------------------------------------- 1. truncated safetensors


@pytest.mark.parametrize("cut", ["half", "inside_header"])
def test_truncated_safetensors_is_refused_before_loading(folder, cut):
    d = folder("safetensors")
    file = os.path.join(d, "model.safetensors")
    size, header = os.path.getsize(file), header_length(file)
    keep = size // 2 if cut == "half" else 8 + header // 2
    os.truncate(file, keep)
    expected = f"expected {size} bytes" if cut == "half" else f"expected at least {8 + header} bytes"
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == f"{file}: the file is truncated or damaged ({expected}, found {keep}); download it again."


def test_truncated_shard_is_named(folder):
    d = folder("safetensors3")
    shard = os.path.join(d, "model-00002-of-00003.safetensors")
    size = os.path.getsize(shard)
    os.truncate(shard, size - 100)
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == (f"{shard}: the file is truncated or damaged (expected {size} bytes, found {size - 100}); "
                            "download it again.")


def test_truncated_safetensors_at_load_time_names_the_file(folder, skip_folder_check):
    d = folder("safetensors3")
    shard = os.path.join(d, "model-00003-of-00003.safetensors")
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    with pytest.raises(UserError) as e:
        load_model(ModelArgs(model_name_or_path=d, quantization="none", device="cpu"))
    assert str(e.value) == (f"{shard}: the file is truncated or damaged (expected {size} bytes, found {size // 2}); "
                            "download it again.")


def test_truncated_safetensors_is_one_line_from_the_script(folder, capsys, no_weights_loaded):
    d = folder("safetensors")
    file = os.path.join(d, "model.safetensors")
    size = os.path.getsize(file)
    os.truncate(file, size // 2)
    assert error_line(cli(d), capsys) == (f"error: {file}: the file is truncated or damaged (expected {size} bytes, "
                                          f"found {size // 2}); download it again.")


def test_damage_the_header_check_cannot_see_is_one_line_at_load_time(folder, capsys):
    # Sizes all add up, but a dtype safetensors does not know: only safetensors itself can tell.
    d = folder("safetensors")
    file = os.path.join(d, "model.safetensors")
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q9"
    raw = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    check_model_folder(d)
    line = error_line(cli(d), capsys)
    assert line.startswith(f"error: {file}: the file is damaged (Error while deserializing header: "), line
    assert line.endswith("); download it again."), line


def test_git_lfs_pointer_and_cut_zip_archive_are_refused(folder):
    d = folder("bin")
    file = os.path.join(d, "pytorch_model.bin")
    shutil.copy(file, file + ".orig")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 14000000000\n"
    with open(file, "wb") as f:
        f.write(pointer)
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == (f"{file}: a Git LFS pointer ({len(pointer)} bytes), not the weights themselves; run "
                            f"`git lfs pull` in {d} or download the file again.")
    shutil.copy(file + ".orig", file)
    os.truncate(file, os.path.getsize(file) // 2)
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == (f"{file}: the file is truncated or damaged (not a complete PyTorch zip archive, found "
                            f"{os.path.getsize(file)} bytes); download it again.")


# --------------------------------------------------------------------------- 2. pickled code in a .bin


class _Payload:
    """Unpickled without torch's weights_only guard, runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant_payload(bin_file: str, marker: str) -> None:
    """Rewrite a real checkpoint with one extra entry that creates `marker` when unpickled unsafely."""
    state = torch.load(bin_file, weights_only=True)
    state["payload"] = _Payload(f"touch {shlex.quote(marker)}")
    torch.save(state, bin_file)


def refused(file: str) -> str:
    culprit = f"{os.system.__module__}.{os.system.__name__}"
    return (f"{file}: refused to load: it contains Python objects other than tensors ({culprit}), which could run "
            "code; nothing in it was executed. Get the model as .safetensors from a trusted source, or convert this "
            "file to safetensors only if you trust where it came from.")


def test_pickled_code_in_pytorch_model_bin_is_refused_and_never_run(folder, tmp_path):
    d = folder("bin")
    file = os.path.join(d, "pytorch_model.bin")
    # The payload is live: an unsafe load runs it.
    live = shutil.copy(file, str(tmp_path / "live.bin"))
    plant_payload(live, str(tmp_path / "live-ran"))
    torch.load(live, weights_only=False)
    assert os.path.exists(tmp_path / "live-ran")
    marker = str(tmp_path / "payload-ran")
    plant_payload(file, marker)

    check_model_folder(d)  # nothing to see without unpickling
    with pytest.raises(UserError) as e:
        load_model(ModelArgs(model_name_or_path=d, quantization="none", device="cpu"))
    assert str(e.value) == refused(file)
    assert not os.path.exists(marker)


def test_pickled_code_is_one_line_from_the_script_and_names_the_shard(folder, tmp_path, capsys):
    d = folder("bin2")
    shard = os.path.join(d, "pytorch_model-00002-of-00002.bin")
    marker = str(tmp_path / "payload-ran")
    plant_payload(shard, marker)
    assert error_line(cli(d), capsys) == f"error: {refused(shard)}"
    assert not os.path.exists(marker)


# --------------------------------------------------------------------------- 3. remote-code tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA folder (safetensors, tokenizer.json) whose tokenizer_config.json asks for remote code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    d = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(d)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(d, "tokenizer.json"))
    return d


def with_tokenizer_config(llama_dir: str, tmp_path, tokenizer_config: dict) -> str:
    d = shutil.copytree(llama_dir, str(tmp_path / "llama"))
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "w2", **tokenizer_config}, f)
    return d


def remote_code(d: str, name: str, ref: str) -> str:
    return (f"{d}/tokenizer_config.json: the tokenizer class {name} is custom Python code from the model folder "
            f"(auto_map: {ref}), not a class transformers has, and --trust_remote_code is off. Pass "
            "--trust_remote_code if you trust the folder's code, or provide a standard tokenizer (tokenizer.json, or "
            "tokenizer.model with a tokenizer_class transformers knows) with --tokenizer_path.")


@pytest.mark.parametrize("tokenizer_config, name, ref", [
    ({"tokenizer_class": "InternLMTokenizer",
      "auto_map": {"AutoTokenizer": ["tokenization_internlm.InternLMTokenizer", None]}},
     "InternLMTokenizer", "tokenization_internlm.InternLMTokenizer"),
    # no tokenizer_class: the class is the one auto_map names (the fast one when both are given)
    ({"auto_map": {"AutoTokenizer": ["tok.SlowTokenizer", "tok.FastTokenizer"]}}, "FastTokenizer", "tok.FastTokenizer"),
    # the legacy list form of auto_map
    ({"tokenizer_class": "QWenTokenizer", "auto_map": ["tokenization_qwen.QWenTokenizer", None]},
     "QWenTokenizer", "tokenization_qwen.QWenTokenizer"),
])
def test_tokenizer_needing_remote_code_is_refused_offline(llama_dir, tmp_path, offline, tokenizer_config, name, ref):
    d = with_tokenizer_config(llama_dir, tmp_path, tokenizer_config)
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == remote_code(d, name, ref)
    # --tokenizer_path skips the model folder's check; loading the tokenizer says the same
    with pytest.raises(UserError) as e:
        load_tokenizer(d)
    assert str(e.value) == remote_code(d, name, ref)


def test_tokenizer_needing_remote_code_is_one_line_from_the_script(llama_dir, tmp_path, offline, capsys,
                                                                   no_weights_loaded):
    d = with_tokenizer_config(llama_dir, tmp_path, {
        "tokenizer_class": "FooTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}})
    expected = remote_code(d, "FooTokenizer", "tokenization_foo.FooTokenizer")
    assert error_line(cli(d), capsys) == f"error: {expected}"


def test_auto_map_next_to_a_class_transformers_has_loads_without_remote_code(llama_dir, tmp_path, offline):
    # transformers uses its own class here and never the folder's code, so the check must not refuse
    d = with_tokenizer_config(llama_dir, tmp_path, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "auto_map": {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}})
    check_model_folder(d)
    assert load_tokenizer(d).convert_tokens_to_ids("w5") == 5


def test_trust_remote_code_lets_the_check_pass(llama_dir, tmp_path, offline):
    d = with_tokenizer_config(llama_dir, tmp_path, {
        "tokenizer_class": "FooTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]}})
    check_model_folder(d, trust_remote_code=True)


def test_baichuan_folders_keep_their_remote_auto_map(tiny_baichuan_dir, tiny_baichuan2_dir, offline):
    # Both name remote tokenizer code; cnqlora's own tokenizer class reads them instead.
    for d in (tiny_baichuan_dir, tiny_baichuan2_dir):
        check_model_folder(d)


# --------------------------------------------------------------------------- 4. impossible sizes


def with_config(folder, **changes) -> tuple[str, str]:
    d = folder("bin")
    config_path = os.path.join(d, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return d, config_path


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 1_000_000), ("hidden_size", 10**9), ("intermediate_size", 10**9), ("vocab_size", 10**9),
])
def test_sizes_the_weights_cannot_hold_are_refused(folder, key, value):
    d, config_path = with_config(folder, **{key: value})
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    message = str(e.value)
    assert message.startswith(f"{config_path}: {key}={value} is implausible: with it the model has at least "), message
    weight_bytes = os.path.getsize(os.path.join(d, "pytorch_model.bin"))
    assert message.endswith(f"but its weight files ({weight_bytes} bytes) hold at most {8 * weight_bytes:.3g} even at "
                            "1 bit each. config.json probably does not belong to these weights: use the config.json "
                            "that came with them."), message


def test_a_million_layers_is_one_line_from_the_script(folder, capsys, no_weights_loaded):
    d, config_path = with_config(folder, num_hidden_layers=1_000_000)
    weight_bytes = os.path.getsize(os.path.join(d, "pytorch_model.bin"))
    # 64 * vocab + 10**6 * (64 * 64 + 2 * 64 * 128)
    assert error_line(cli(d), capsys) == (
        f"error: {config_path}: num_hidden_layers=1000000 is implausible: with it the model has at least 2.05e+10 "
        f"parameters, but its weight files ({weight_bytes} bytes) hold at most {8 * weight_bytes:.3g} even at 1 bit "
        "each. config.json probably does not belong to these weights: use the config.json that came with them.")


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 1e6), ("hidden_size", 0), ("intermediate_size", -128), ("vocab_size", "64000"),
    ("num_attention_heads", True), ("hidden_size", 64.5), ("intermediate_size", [128, 0]),
])
def test_sizes_that_are_not_positive_whole_numbers_are_refused(folder, key, value):
    d, config_path = with_config(folder, **{key: value})
    with pytest.raises(UserError) as e:
        check_model_folder(d)
    assert str(e.value) == (f"{config_path}: {key} must be a positive whole number, got {json.dumps(value)}; "
                            "config.json is damaged or does not belong to these weights: use the config.json that "
                            "came with them.")


# Real configs (their size keys) with their parameter counts.
REAL_MODELS = {
    "Baichuan-7B": ("baichuan", dict(vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, max_position_embeddings=4096), 7_000_559_616),
    "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
                     494_032_768),
    "Llama-2-70B": ("llama", dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
                    68_976_648_192),
}


@pytest.mark.parametrize("model", sorted(REAL_MODELS))
@pytest.mark.parametrize("bits", [16, 4, 1])
def test_real_configs_pass_whatever_the_storage(model, bits):
    model_type, config, params = REAL_MODELS[model]
    sizes = _config_sizes("config.json", {"model_type": model_type, **config}, model_type)
    assert implausible_config_sizes(sizes, params * bits // 8) is None


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mixtral", "gemma2", "gpt2", "mamba", "bloom", "gpt_oss"])
def test_the_parameter_estimate_is_a_lower_bound(model_type):
    # transformers' default config of each architecture, with 2 layers to keep it quick
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, num_hidden_layers=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    sizes = _config_sizes("config.json", config.to_dict(), model_type)
    assert sizes["num_hidden_layers"][1] == 2 and "hidden_size" in sizes
    assert _min_parameters({k: v for k, (_, v) in sizes.items()}) <= params

"""Loading tokenizers and (quantised) causal LMs, and attaching LoRA.

Baichuan is implemented in `cnqlora.baichuan` and registered with the Auto classes, so a
Baichuan folder loads like any other causal LM and no code from the model folder is executed
(`trust_remote_code` stays off unless the user asks). A folder is checked before anything heavy
is loaded: a missing shard should cost a second, not the ten minutes of loading the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .config import opt
from .errors import UserError

QUANTIZATIONS = ("4bit", "8bit", "none")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArgs:
    """Model"""

    model_name_or_path: str = opt("model_hub/baichuan-7B", "folder of the base model (Hugging Face layout)",
                                  aliases=("base_model",))
    tokenizer_path: str | None = opt(None, "folder of the tokenizer; default: the model folder")
    quantization: str = opt("4bit", "weights of the base model: 4bit (NF4, double quant), 8bit (LLM.int8) or "
                            "none (16-bit)", choices=QUANTIZATIONS)
    compute_dtype: str = opt("auto", "dtype of activations and of unquantised weights; auto: bfloat16 on GPUs that "
                             "support it, else float16; float32 on the CPU", choices=DTYPES)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = opt(False, "run Python code shipped in the model folder (never needed for Baichuan, "
                                  "Qwen2 or LLaMA)")


@dataclass
class LoraArgs:
    """LoRA"""

    lora_r: int = opt(8, "LoRA rank; higher adds capacity, memory and time")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target: list[str] = opt(["all-linear"], "module names to adapt, comma separated; all-linear = every linear "
                                 "layer of the blocks (Baichuan: W_pack,o_proj,gate_proj,up_proj,down_proj)")


# --------------------------------------------------------------------------- folders


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged, download it again.") from None


def check_model_folder(path: str, need_tokenizer: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """Check that a folder holds a complete model; return its config.json. No weights are read."""
    hint = ("Download the model into that folder (for Baichuan-7B: config.json, pytorch_model.bin or its shards, "
            "tokenizer.model, tokenizer_config.json), or point --model_name_or_path at it.")
    if not os.path.isdir(path):
        raise UserError(f"{path}: model folder not found. {hint}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no config.json, so this is not a Hugging Face model folder. {hint}")
    config = _read_json(config_path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{config_path}: has no model_type; it is not a transformers model config.")
    model_type = config["model_type"]
    if model_type == "baichuan":
        from .baichuan import BaichuanConfig, unsupported_reason

        reason = unsupported_reason(BaichuanConfig(**{k: v for k, v in config.items() if k != "model_type"}))
        if reason:
            raise UserError(f"{path}: {reason}")
    else:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING and not trust_remote_code:
            raise UserError(f"{path}: model_type '{model_type}' is not known to this transformers version. If the "
                            "folder ships its own modeling code and you trust it, pass --trust_remote_code.")
        if model_type in CONFIG_MAPPING and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"{path}: model_type '{model_type}' is not a causal (text-generating) language model; "
                            "this toolkit fine-tunes causal LMs such as Baichuan, Qwen2 or LLaMA.")
    _check_weights(path, hint)
    if need_tokenizer:
        check_tokenizer_folder(path)
    return config


def _check_weights(path: str, hint: str) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            index = _read_json(index_path)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise UserError(f"{index_path}: lists no weight files; the download is incomplete.")
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise UserError(f"{path}: missing weight shard(s) {', '.join(missing)} named in {index_name}; "
                                "the download is incomplete.")
            return
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
        raise UserError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index). {hint}")


def check_tokenizer_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"{path}: tokenizer folder not found.")
    names = set(os.listdir(path))
    if not ({"tokenizer.model", "tokenizer.json"} & names or {"vocab.json", "merges.txt"} <= names):
        raise UserError(f"{path}: no tokenizer files (tokenizer.model, tokenizer.json or vocab.json + merges.txt). "
                        "Copy them from the model's download, or set --tokenizer_path.")


# --------------------------------------------------------------------------- loading


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible. Use --device cpu (slow) or check the driver.")
    return device


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bf16 matmuls on most CPUs are emulated and slower than fp32.
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder; Baichuan's SentencePiece tokenizer without its remote code."""
    check_tokenizer_folder(path)
    from .baichuan import is_baichuan_folder, load_baichuan_tokenizer

    if is_baichuan_folder(path) or _names_baichuan_tokenizer(path):
        tokenizer = load_baichuan_tokenizer(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do; EOS is the
        # usual choice and keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _names_baichuan_tokenizer(path: str) -> bool:
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return False
    return str(_read_json(config_path).get("tokenizer_class", "")).lower() == "baichuantokenizer"


def quantization_config(quantization: str, dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(args: ModelArgs, device: str | None = None):
    """The base model, quantised as asked, on one device."""
    import cnqlora.baichuan  # noqa: F401  registers Baichuan with the Auto classes
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(args.device)
    dtype = resolve_dtype(args.compute_dtype, device)
    check_model_folder(args.model_name_or_path, need_tokenizer=False, trust_remote_code=args.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path,
            quantization_config=quantization_config(args.quantization, dtype),
            dtype=dtype,
            device_map={"": device},
            trust_remote_code=args.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{args.model_name_or_path}: cannot load the model: {e}") from None
    model.config.use_cache = False
    return model


def linear_module_names(model) -> list[str]:
    """Distinct names of the linear layers inside the transformer blocks (not the LM head)."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_lora_targets(model, targets: list[str]) -> list[str]:
    available = linear_module_names(model)
    if targets in (["all-linear"], ["all"]):
        if not available:
            raise UserError("found no linear layers inside the model's blocks to attach LoRA to; set --lora_target.")
        return available
    unknown = [t for t in targets if t not in available]
    if unknown:
        extra = ""
        if {"q_proj", "k_proj", "v_proj"} & set(unknown) and "W_pack" in available:
            extra = " Baichuan has no q_proj/k_proj/v_proj: its q, k and v are one layer, W_pack."
        raise UserError(f"--lora_target: {', '.join(unknown)} not found in the model; its linear layers are "
                        f"{', '.join(available)}.{extra}")
    return list(targets)


def attach_lora(model, args: LoraArgs, gradient_checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, args.lora_target)
    if gradient_checkpointing:
        # Non-reentrant checkpointing propagates gradients to the LoRA weights even though the
        # embeddings (the checkpoint's inputs) are frozen.
        # transformers 5.24 renamed the method; 5.17 (common on GPU images) only has the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config), targets


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts as its real number of values."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        # bitsandbytes packs two 4-bit values per uint8 element.
        if param.__class__.__name__ == "Params4bit":
            n = int(param.quant_state.shape.numel()) if getattr(param, "quant_state", None) else n * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total

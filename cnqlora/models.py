"""Loading tokenizers and (quantised) causal LMs, and attaching LoRA.

Baichuan is implemented in `cnqlora.baichuan` and registered with the Auto classes, so a
Baichuan folder loads like any other causal LM and no code from the model folder is executed
(`trust_remote_code` stays off unless the user asks). A folder is checked before anything heavy
is loaded: a missing shard should cost a second, not the ten minutes of loading the others.
"""

from __future__ import annotations

import json
import os
import re
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


# In the order transformers looks for them: the first one present is the one it loads.
_WEIGHT_LAYOUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# safetensors itself refuses longer headers, so a larger "length" means the file starts with no header.
_SAFETENSORS_MAX_HEADER = 100_000_000
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# Config keys holding sizes (transformers' canonical names; a model's attribute_map may spell them
# differently in config.json, e.g. GPT-2's n_layer).
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged, download it again.") from None


def check_model_folder(path: str, need_tokenizer: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """Check that a folder holds a complete model; return its config.json. No weights are read
    (only the few bytes that say how big each weight file must be)."""
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
    # Before any config class sees the sizes: transformers' strict config classes answer a float or a
    # string with a traceback, and a huge layer count makes model construction run for hours.
    sizes = _config_sizes(config_path, config, model_type)
    if model_type == "baichuan":
        from huggingface_hub.errors import StrictDataclassError

        from .baichuan import BaichuanConfig, unsupported_reason

        try:
            baichuan_config = BaichuanConfig(**{k: v for k, v in config.items() if k != "model_type"})
        except (StrictDataclassError, TypeError, ValueError) as e:
            raise UserError(f"{config_path}: {' '.join(str(e).split())}") from None
        reason = unsupported_reason(baichuan_config)
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
    weight_files = _check_weights(path, hint)
    problem = implausible_config_sizes(sizes, sum(os.path.getsize(f) for f in weight_files))
    if problem:
        raise UserError(f"{config_path}: {problem}")
    if need_tokenizer:
        check_tokenizer_folder(path, trust_remote_code)
    return config


def _check_weights(path: str, hint: str) -> list[str]:
    """The weight files transformers will load from the folder, each checked for completeness."""
    files = _weight_files(path, hint)
    for file in files:
        _check_weight_file(file)
    return files


def _weight_files(path: str, hint: str) -> list[str]:
    for layout in _WEIGHT_LAYOUTS:
        layout_path = os.path.join(path, layout)
        if not os.path.isfile(layout_path):
            continue
        if not layout.endswith(".index.json"):
            return [layout_path]
        index = _read_json(layout_path)
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise UserError(f"{layout_path}: lists no weight files; the download is incomplete.")
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise UserError(f"{path}: missing weight shard(s) {', '.join(missing)} named in {layout}; "
                            "the download is incomplete.")
        return [os.path.join(path, s) for s in shards]
    raise UserError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index). {hint}")


def weight_file_bytes(path: str) -> int:
    """Bytes of the weight files transformers will load from a model folder."""
    return sum(os.path.getsize(f) for f in _weight_files(path, ""))


def _check_weight_file(file: str) -> None:
    """Refuse a weight file that cannot be complete; reads its header (kilobytes), never the tensors."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(len(_LFS_POINTER))
        if head == _LFS_POINTER:
            raise UserError(f"{file}: a Git LFS pointer ({size} bytes), not the weights themselves; run "
                            f"`git lfs pull` in {os.path.dirname(file) or '.'} or download the file again.")
        if file.endswith(".safetensors"):
            f.seek(0)
            _check_safetensors(file, f, size)
    if file.endswith(".bin") and head.startswith(b"PK\x03\x04"):
        import zipfile

        # torch.save's archives end with the zip directory: a cut-off file has none.
        try:
            zipfile.ZipFile(file).close()
        except zipfile.BadZipFile:
            raise UserError(f"{file}: the file is truncated or damaged (not a complete PyTorch zip archive, "
                            f"found {size} bytes); download it again.") from None


def _check_safetensors(file: str, f, size: int) -> None:
    # The format: an 8-byte little-endian header length, a JSON header giving each tensor's
    # [begin, end) inside the data that follows; safetensors wants the data to fill the file exactly.
    def damaged(detail: str) -> UserError:
        return UserError(f"{file}: the file is truncated or damaged ({detail}); download it again.")

    if size < 8:
        raise damaged(f"expected at least 8 bytes, found {size}")
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > _SAFETENSORS_MAX_HEADER:
        raise damaged("it does not start with a safetensors header")
    if 8 + header_len > size:
        raise damaged(f"expected at least {8 + header_len} bytes, found {size}")
    try:
        header = json.loads(f.read(header_len))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if not all(isinstance(end, int) and not isinstance(end, bool) and end >= 0 for end in ends):
            raise TypeError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise damaged("its header is not valid safetensors JSON") from None
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise damaged(f"expected {expected} bytes, found {size}")


def _config_sizes(config_path: str, config: dict[str, Any], model_type: str) -> dict[str, tuple[str, int]]:
    """The size keys of config.json that hold one number: canonical name -> (name in the file, value).
    A size that is not a positive whole number is refused."""
    aliases: dict[str, str] = {}
    try:
        if model_type == "baichuan":
            from .baichuan import BaichuanConfig as config_class
        else:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            config_class = CONFIG_MAPPING[model_type]
        aliases = dict(getattr(config_class, "attribute_map", None) or {})
    except KeyError:
        pass
    sizes = {}
    for key in _SIZE_KEYS:
        name = key if key in config else aliases.get(key, key)
        value = config.get(name)
        if value is None:
            continue
        # Some models give one size per layer.
        values = value if isinstance(value, list) and value else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise UserError(f"{config_path}: {name} must be a positive whole number, got {json.dumps(value)}; "
                            "config.json is damaged or does not belong to these weights: use the config.json "
                            "that came with them.")
        if not isinstance(value, list):
            sizes[key] = (name, value)
    return sizes


def _min_parameters(values: dict[str, int]) -> int:
    """A lower bound on the parameters of a transformer with these sizes: the embedding (once, in
    case it is tied) plus, per layer, an up and a down projection of the MLP and half of attention's
    q and o; a size the config does not give counts as nothing. Gated MLPs, k/v, experts and norms
    only add, so it stays below the real count (tests/test_faults_models.py checks architectures
    from LLaMA to Mixtral, GPT-2 and Mamba); hybrids whose layers lack an MLP (Nemotron-H) overshoot
    a little, which the margin in `implausible_config_sizes` absorbs."""
    hidden = values.get("hidden_size", 0)
    per_layer = hidden * hidden + 2 * hidden * values.get("intermediate_size", 0)
    return hidden * values.get("vocab_size", 0) + values.get("num_hidden_layers", 0) * per_layer


def implausible_config_sizes(sizes: dict[str, tuple[str, int]], weight_bytes: int) -> str | None:
    """Why config.json's sizes cannot describe weight files of `weight_bytes` bytes in all, or None.

    Even 1 bit per parameter (below 4-bit quantisation, below ternary weights) lets the files hold
    8 parameters a byte; a config needing more than that, by a lower bound, belongs to something
    else (or has a typo such as an extra zero run). The margin over real storage (16x for 16-bit
    files, 4x for 4-bit ones) leaves room for an estimate that overshoots an unusual architecture.
    """
    values = {key: value for key, (_, value) in sizes.items()}
    needed = _min_parameters(values)
    capacity = 8 * weight_bytes
    if needed <= capacity:
        return None
    # The key that, set to 1, shrinks the bound the most is the one to name.
    culprit = min((k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size") if k in values),
                  key=lambda k: _min_parameters({**values, k: 1}))
    name, value = sizes[culprit]
    return (f"{name}={value} is implausible: with it the model has at least {needed:.3g} parameters, but its weight "
            f"files ({weight_bytes} bytes) hold at most {capacity:.3g} even at 1 bit each. config.json probably does "
            "not belong to these weights: use the config.json that came with them.")


def check_tokenizer_folder(path: str, trust_remote_code: bool = False) -> None:
    if not os.path.isdir(path):
        raise UserError(f"{path}: tokenizer folder not found.")
    names = set(os.listdir(path))
    if not ({"tokenizer.model", "tokenizer.json"} & names or {"vocab.json", "merges.txt"} <= names):
        raise UserError(f"{path}: no tokenizer files (tokenizer.model, tokenizer.json or vocab.json + merges.txt). "
                        "Copy them from the model's download, or set --tokenizer_path.")
    if not trust_remote_code:
        remote = _remote_tokenizer(path)
        if remote:
            raise UserError(_remote_tokenizer_message(path, *remote))


def _remote_tokenizer(path: str) -> tuple[str, str] | None:
    """(class name, auto_map reference) when AutoTokenizer would need the folder's own Python code,
    following transformers' rule: an auto_map entry counts unless a class transformers has is named."""
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    config = _read_json(config_path)
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    refs = [r for r in (entry if isinstance(entry, (list, tuple)) else [entry]) if isinstance(r, str) and r]
    if not refs:
        return None
    from .baichuan import is_baichuan_folder

    if is_baichuan_folder(path) or _names_baichuan_tokenizer(path):
        return None  # cnqlora's own Baichuan tokenizer is used, never the folder's
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, tokenizer_class_from_name

    name = config.get("tokenizer_class")
    if isinstance(name, str) and name and tokenizer_class_from_name(name.removesuffix("Fast")) is not None:
        return None
    model_config = os.path.join(path, "config.json")
    if os.path.isfile(model_config):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_config = _read_json(model_config)
        model_type = model_config.get("model_type") if isinstance(model_config, dict) else None
        if model_type in CONFIG_MAPPING and CONFIG_MAPPING[model_type] in TOKENIZER_MAPPING:
            return None  # transformers has this model's tokenizer and prefers it
    # transformers takes the fast class (second entry) when there is one.
    ref = refs[-1]
    return (name if isinstance(name, str) and name else ref.rsplit(".", 1)[-1]), ref


def _remote_tokenizer_message(path: str, name: str | None, ref: str | None) -> str:
    what = f"the tokenizer class {name} is custom Python code from the model folder (auto_map: {ref})" if name else \
        "the tokenizer is custom Python code from the model folder (its auto_map)"
    return (f"{os.path.join(path, 'tokenizer_config.json')}: {what}, not a class transformers has, and "
            "--trust_remote_code is off. Pass "
            "--trust_remote_code if you trust the folder's code, or provide a standard tokenizer (tokenizer.json, "
            "or tokenizer.model with a tokenizer_class transformers knows) with --tokenizer_path.")


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
    check_tokenizer_folder(path, trust_remote_code)
    from .baichuan import is_baichuan_folder, load_baichuan_tokenizer

    if is_baichuan_folder(path) or _names_baichuan_tokenizer(path):
        tokenizer = load_baichuan_tokenizer(path)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except ValueError as e:
            # The folder check mirrors transformers' rule; this catches what it does not foresee.
            if trust_remote_code or "trust_remote_code" not in str(e):
                raise
            raise UserError(_remote_tokenizer_message(path, *(_remote_tokenizer(path) or (None, None)))) from None
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
    except Exception as e:
        error = _weights_error(args.model_name_or_path, e)
        if error is None and isinstance(e, (OSError, ValueError)):
            error = UserError(f"{args.model_name_or_path}: cannot load the model: {e}")
        if error is None:
            raise
        raise error from None
    model.config.use_cache = False
    keep_4bit_differentiable(model)
    return model


def _weights_error(path: str, error: Exception) -> UserError | None:
    """The UserError for an exception raised while transformers read the weight files, or None."""
    import pickle

    from safetensors import SafetensorError

    message = str(error)
    unpickling = isinstance(error, pickle.UnpicklingError)
    if not (isinstance(error, SafetensorError) or unpickling
            or (isinstance(error, RuntimeError) and "PytorchStreamReader" in message)):
        return None
    try:
        # None of these errors says which file; the folder check can, when the file is incomplete.
        files = _check_weights(path, "")
    except UserError as found:
        return found
    if unpickling and message.startswith("Weights only load failed"):
        # torch's weights_only loader stops at the first global it does not allow, before calling it.
        found = re.search(r"GLOBAL (\S+)", message)
        culprit = found.group(1) if found else None
        candidates = [f for f in files if f.endswith(".bin")]
        file = _pickle_naming(candidates, culprit) or (candidates[0] if len(candidates) == 1 else None)
        return UserError(f"{file or path + ': one of the .bin weight files'}: refused to load: it contains Python "
                         f"objects other than tensors{f' ({culprit})' if culprit else ''}, which could run code; "
                         "nothing in it was executed. Get the model as .safetensors from a trusted source, or convert "
                         "this file to safetensors only if you trust where it came from.")
    where = files[0] if len(files) == 1 else f"{path}: a weight file"
    reason = " ".join(message.split()).split(". ")[0]
    return UserError(f"{where}: the file is damaged ({reason}); download it again.")


def _pickle_naming(files: list[str], culprit: str | None) -> str | None:
    """The first of torch's zip archives whose pickle mentions the global `culprit` (module.name)."""
    import zipfile

    if not culprit or "." not in culprit:
        return None
    module, name = culprit.rsplit(".", 1)
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = b"".join(archive.read(n) for n in pickles)
        except (OSError, zipfile.BadZipFile):
            continue
        if module.encode() in data and name.encode() in data:
            return file
    return None


def keep_4bit_differentiable(model) -> int:
    """Keep bitsandbytes from switching 4-bit layers to its inference-only CPU format; return how
    many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place the
    first time it runs in eval mode without grad, i.e. at the first dev evaluation. The packed
    weight goes through a kernel with no backward: later training steps silently lose the
    gradients through the base layers (earlier layers' LoRA get none), and saving a checkpoint
    unpacks it again, so a run behaves differently before and after each save. Training, dev
    evaluation and prediction share one model, so the switch is turned off for good, at load
    time: undoing a repacking is lossy (the block scales went through bfloat16), so a weight
    already packed is unpacked as well as bitsandbytes can.
    """
    touched = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        touched += 1
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
    return touched


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

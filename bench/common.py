"""Helpers shared by bench/train_speed.py and bench/predict_speed.py.

The benchmarks time a Baichuan-7B-shaped model whose weights are random: speed does not depend
on the values, so no 14 GB checkpoint has to reach the GPU machine (which cannot download one),
and the model is built on the GPU in seconds. The data is real (MSRA through the real Baichuan
vocabulary), so sequence lengths, padding and token counts are what training really sees.

`--tiny` swaps everything for CPU-sized stand-ins (a 2-layer, 64-wide Baichuan, a SentencePiece
model trained on the fly, a synthetic MSRA-like corpus) so the whole script runs in seconds on a
laptop and in the tests: GPU time is too scarce to find a typo with.
"""

from __future__ import annotations

import time

# Budgets count from here, before the heavy imports below.
STARTED = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cnqlora.baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer  # noqa: E402
from cnqlora.msra import MSRA_TRAIN_SENTENCES, read_tagged, sentence_to_record  # noqa: E402

BAICHUAN_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                   vocab_size=64000)
# Same proportions as 7B (intermediate / hidden = 2.69), small enough for a CPU test.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172)
# QLoRA costs about 4N FLOPs per trained token (forward 2N, backward for the activations 2N; the
# frozen weights get no gradient), N = Baichuan-7B's parameter count.
FLOPS_PER_TOKEN = 4 * 6.7e9

# Where the real inputs are: next to the checkout on the developer machine (../shared), or in the
# ignored .up/ folder that is carried to the GPU machine.
MSRA_CANDIDATES = ("../shared/data/msra/dh_msra.txt", ".up/dh_msra.txt")
TOKENIZER_CANDIDATES = ("../shared/data/baichuan-vocab/tokenizer.model", ".up/tokenizer.model")
TINY_SENTENCES, TINY_TRAIN = 400, 320


# --------------------------------------------------------------------------- logging and time


_clock_started = False


def start_clock() -> None:
    """Count from the import (the process start) on a script's first run, from now on later runs in-process."""
    global STARTED, _clock_started
    if _clock_started:
        STARTED = time.perf_counter()
    _clock_started = True


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(message: str) -> None:
    print(f"[{elapsed():7.1f}s] {message}", flush=True)


class Phases:
    """Wall time of each phase, printed as it ends and kept for the JSON report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log(f"{name} ...")
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 2)
            log(f"{name}: {took:.1f}s")


class Budget:
    """The run's wall-clock allowance, counted from the start of the process (imports included)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - elapsed()

    def allows(self, estimate: float, what: str) -> bool:
        if estimate <= self.left():
            return True
        log(f"SKIPPED {what}: needs ~{estimate:.0f}s, {max(0.0, self.left()):.0f}s left of --time_budget {self.seconds:.0f}")
        return False


# --------------------------------------------------------------------------- command line


def begin(args: argparse.Namespace) -> tuple[Phases, Budget, str, dict[str, Any]]:
    """What both scripts do first: clock, phases, time budget, device check, the report's header."""
    start_clock()
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible; use --tiny for the CPU smoke run")
    phases = Phases()
    report: dict[str, Any] = {"tiny": args.tiny, "environment": environment(device), "phases": phases.seconds,
                              "args": {k: v for k, v in vars(args).items() if k != "recipe_list"}}
    return phases, Budget(args.time_budget), device, report


def add_common_args(parser: argparse.ArgumentParser, time_budget: float) -> None:
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke mode: tiny model, generated corpus and tokenizer (no /work/shared needed)")
    parser.add_argument("--msra", default=None,
                        help=f"MSRA corpus (dh_msra.txt); default: the first of {', '.join(MSRA_CANDIDATES)}")
    parser.add_argument("--tokenizer", default=None,
                        help="Baichuan SentencePiece tokenizer.model; default: the first of "
                             + ", ".join(TOKENIZER_CANDIDATES))
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--time_budget", type=float, default=time_budget,
                        help="seconds (from process start) after which remaining measurements are skipped")
    parser.add_argument("--seed", type=int, default=0, help="seed of the record subset and of the random weights")
    parser.add_argument("--workdir", default=None, help="--tiny: folder for the generated corpus and tokenizer "
                                                        "(default: a temporary folder)")


def _first_existing(given: str | None, candidates: Sequence[str], what: str) -> str:
    if given:
        if not os.path.isfile(given):
            sys.exit(f"{what} {given}: no such file")
        return given
    for candidate in candidates:
        for base in (os.getcwd(), REPO):
            path = os.path.normpath(os.path.join(base, candidate))
            if os.path.isfile(path):
                return path
    sys.exit(f"no {what} found at {', '.join(candidates)} (relative to {os.getcwd()} or {REPO}); pass its path")


def resolve_inputs(args: argparse.Namespace) -> tuple[str, str, int]:
    """(MSRA corpus, tokenizer.model, number of train sentences) for this run."""
    if args.tiny:
        import tempfile

        workdir = args.workdir or tempfile.mkdtemp(prefix="cnqlora-bench-")
        corpus, tokenizer = write_tiny_inputs(workdir, seed=args.seed)
        return corpus, tokenizer, TINY_TRAIN
    return (_first_existing(args.msra, MSRA_CANDIDATES, "MSRA corpus"),
            _first_existing(args.tokenizer, TOKENIZER_CANDIDATES, "tokenizer.model"), MSRA_TRAIN_SENTENCES)


# --------------------------------------------------------------------------- data

def write_tiny_inputs(workdir: str, seed: int = 0) -> tuple[str, str]:
    """A synthetic tagged corpus and a SentencePiece model trained on its prompts."""
    from cnqlora.tiny import synthetic_ner_sentences, train_sentencepiece, write_bio

    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, "tiny_msra.txt")
    sentences = synthetic_ner_sentences(TINY_SENTENCES, seed, words=(4, 40))
    write_bio(corpus, sentences)
    texts = [seed_prompt(r) + r["answer"] for r in
             (sentence_to_record([c for c, _ in s], [t for _, t in s]) for s in sentences)]
    tokenizer = train_sentencepiece(texts, os.path.join(workdir, "tokenizer.model"), vocab_size=800)
    return corpus, tokenizer


def load_sentences(path: str, train_sentences: int):
    """(train, test) tagged sentences: the official MSRA split is by position."""
    sentences = read_tagged(path)
    if len(sentences) <= train_sentences:
        sys.exit(f"{path}: {len(sentences)} sentences, expected more than the {train_sentences} of the train split")
    return sentences[:train_sentences], sentences[train_sentences:]


def to_records(sentences) -> list[dict[str, str]]:
    return [sentence_to_record(s.chars, s.tags) for s in sentences]


def seed_prompt(record: dict[str, str]) -> str:
    """The seed's prompt (GUIDE section 1), with its instruction and query."""
    return f"Human: \n{record['instruct']}\n{record['query']}\n\nAssistant: \n"


def load_tokenizer(path: str) -> BaichuanTokenizer:
    tokenizer = BaichuanTokenizer(vocab_file=path)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    return tokenizer


# --------------------------------------------------------------------------- model


def model_config(tiny: bool, vocab_size: int | None = None) -> BaichuanConfig:
    sizes = dict(TINY, vocab_size=vocab_size) if tiny else dict(BAICHUAN_7B)
    config = BaichuanConfig(**sizes)
    config.use_cache = False
    return config


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _block_linears(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear and child is not head:
                found.append((module, child_name, child))
    return found


def quantize_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """The NF4 (double-quantised) Linear4bit that from_pretrained's bitsandbytes path would build."""
    import bitsandbytes as bnb

    device = linear.weight.device
    # Built on meta so no second full-precision weight is allocated; Params4bit quantises on .to().
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4", module=layer).to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer


def mark_4bit(model, compute_dtype: torch.dtype) -> None:
    """Make a hand-quantised model look like one from from_pretrained(quantization_config=NF4).

    peft reads these attributes: prepare_model_for_kbit_training enables gradient checkpointing
    only for k-bit models, and get_peft_model picks its bitsandbytes LoRA layers from
    is_loaded_in_4bit.
    """
    from transformers.utils.quantization_config import QuantizationMethod

    from cnqlora.models import quantization_config

    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    # Informational only (nothing here reads them back): never let a stricter transformers
    # version stop the benchmark over them.
    try:
        model.is_quantized = True
        model.config.quantization_config = quantization_config("4bit", compute_dtype)
    except Exception as e:  # noqa: BLE001
        log(f"note: could not record the quantization config on the model ({type(e).__name__}: {e})")


def build_model(config: BaichuanConfig, device: str, seed: int = 0, quantize: bool = True,
                compute_dtype: torch.dtype = torch.bfloat16):
    """A Baichuan with random weights (std 0.02), block linears in NF4, the rest in compute_dtype.

    The whole model is first created in compute_dtype directly on `device` (13.5 GB for 7B, fine on
    an H200 and far simpler than materialising from the meta device), then each block linear is
    swapped for its quantised version and the 16-bit original freed.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    with default_dtype(compute_dtype), torch.device(device):
        model = BaichuanForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if quantize:
        # Popped, not iterated, so that the list does not keep every 16-bit original alive until
        # the end: each one goes as soon as the next is taken (7B: 13 GB in total).
        pending = _block_linears(model)[::-1]
        while pending:
            parent, name, linear = pending.pop()
            setattr(parent, name, quantize_linear(linear, compute_dtype))
        mark_4bit(model, compute_dtype)
        from cnqlora.models import keep_4bit_differentiable

        keep_4bit_differentiable(model)
    model.train()
    return model


def build_generation_model(tiny: bool, vocab_size: int, device: str, seed: int, compute_dtype: torch.dtype):
    """build_model's NF4 Baichuan (7B shape, or the tiny one), in eval mode with its KV cache on.

    model_config turns the cache off for training; generation needs it (the seed had it on).
    """
    model = build_model(model_config(tiny, vocab_size=vocab_size), device, seed=seed, compute_dtype=compute_dtype)
    model.eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model


def dequantize_model(model, dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace every Linear4bit by a plain Linear holding its dequantised weight (in place).

    This is the merged-16-bit model predict.py's merge writes, with the same values the 4-bit
    model computes with, so both models compute the same function.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = child.weight
            state = weight.quant_state
            data = weight.data
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes repacks CPU weights for its AVX512-BF16 kernel at the first inference.
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

                data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            full = F.dequantize_4bit(data, quant_state=state).to(dtype)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                               device="meta")
            linear.weight = nn.Parameter(full, requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, linear)
    for attribute in ("is_loaded_in_4bit", "is_quantized", "quantization_method"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    try:
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    except Exception:  # noqa: BLE001  (informational, see mark_4bit)
        pass


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the 4-bit weights with their quantisation statistics, bytes of every other parameter)."""
    import bitsandbytes as bnb

    quantized = other = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quantized += module.weight.data.nbytes
            state = module.weight.quant_state
            for tensor in (state.absmax, getattr(state.state2, "absmax", None), state.code,
                           getattr(state.state2, "code", None), state.offset):
                if isinstance(tensor, torch.Tensor):
                    quantized += tensor.nbytes
            continue
        for param in module.parameters(recurse=False):
            other += param.data.nbytes
    return quantized, other


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        return version("liger-kernel")
    except Exception:
        return None


# --------------------------------------------------------------------------- device


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def allocated(device: str) -> int | None:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_tflops(n: int = 8192, warmup: int = 3, reps: int = 10) -> float:
    """Median bf16 matmul rate on random data (zeros run faster: less switching power)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    torch.cuda.synchronize()
    rates = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        rates.append(2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return sorted(rates)[len(rates) // 2]


def environment(device: str) -> dict[str, Any]:
    import bitsandbytes
    import peft
    import transformers

    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "liger_kernel": liger_version()}
    log(", ".join(f"{k} {v}" for k, v in info.items()))
    return info


# --------------------------------------------------------------------------- measuring


def guarded(run: Callable[[str], dict[str, Any]], device: str, retry_without_liger: bool = True) -> dict[str, Any]:
    """Run one measurement; an error is reported, not raised, so the others still get measured.

    `run` gets the fused-kernel choice, "auto" and, on a retry, "off". Liger's Triton kernels are
    the part of the fast path most likely to break on a new GPU software stack, so a failure with
    them is retried once without them (and says so).
    """
    try:
        return run("auto")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"[:300]
        # Running out of time or memory has nothing to do with Liger: a retry would only repeat it.
        retry_without_liger = retry_without_liger and not isinstance(e, (TimeoutError, torch.cuda.OutOfMemoryError))
    finally:
        free_memory(device)
    if not (retry_without_liger and device.startswith("cuda") and liger_version()):
        return {"status": f"error: {error}"}
    log(f"retrying without Liger kernels after: {error}")
    try:
        result = run("off")
        result["status"] = f"{result.get('status', 'ok')} (WITHOUT Liger: with it, {error})"[:400]
        return result
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"status": f"error: {error}; without Liger: {type(e).__name__}: {e}"[:400]}
    finally:
        free_memory(device)


def add_ratio_to_seed(results: dict[str, dict[str, Any]], seed: str, rate: str) -> None:
    """Give every result with a `rate` its ratio_to_seed: that rate over the `seed` result's (None without one)."""
    seed_rate = results.get(seed, {}).get(rate)
    for result in results.values():
        if rate in result:
            result["ratio_to_seed"] = result[rate] / seed_rate if seed_rate else None


# --------------------------------------------------------------------------- reporting


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
    log(f"numbers written to {path}")

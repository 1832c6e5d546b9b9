"""How a training step runs fast: memory mode, token budget, fused kernels, 16-bit compute.

The choices, and why:

- memory mode `fast` keeps every activation (no recomputation); `lean` recomputes each block
  in the backward pass (activation checkpointing: about a third more compute, a fraction of the
  memory); `offload` also moves the checkpointed block inputs to pinned CPU memory. `auto`
  takes the fastest mode whose estimated activations fit in the GPU's free memory.
- micro-batches are filled by a token budget (`max_tokens_per_batch`) with length-grouped
  samples, so little compute goes to padding; on the GPU the budget follows from the memory
  mode and the free memory unless the user sets it.
- training batches are right-padded and run without an attention mask: with causal attention a
  real token only ever sees earlier tokens, which are all real, so the mask changes nothing for
  them, and dropping it lets PyTorch use its flash-attention kernel. Padding positions produce
  hidden states nobody reads; they carry no label.
- LoRA weights stay float32 (the optimizer's master copy) but run under autocast in the
  compute dtype, so no activation is copied to float32 on its way through a LoRA layer.
- Liger-Kernel's fused RMSNorm, SwiGLU and RoPE replace the eager ones when it is installed and
  a CUDA GPU is present (`fused_kernels: auto`); without them everything runs as before.
"""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass
from typing import Any

from .errors import UserError

MEMORY_MODES = ("auto", "fast", "lean", "offload")
FUSED_KERNELS = ("auto", "liger", "off")
DEFAULT_MAX_TOKENS = 8192
# Estimates are multiplied by this before they are compared with free memory: allocator
# fragmentation, dequantised weight tiles and the logits at answer positions come on top.
SAFETY = 1.5


@dataclass
class SpeedPlan:
    memory_mode: str
    max_tokens: int
    fused_kernels: str
    autocast_dtype: Any
    notes: list[str]

    def describe(self) -> str:
        tokens = f"{self.max_tokens} tokens per micro-batch" if self.max_tokens else "batches by samples"
        dtype = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype is not None else "off"
        return (f"memory mode {self.memory_mode}, {tokens}, fused kernels {self.fused_kernels}, autocast {dtype}"
                + (f" ({'; '.join(self.notes)})" if self.notes else ""))


def activation_bytes_per_token(config: Any, mode: str) -> float:
    """Rough bytes of saved activations per token of a micro-batch, in 16-bit.

    Per block, a token keeps about 14 hidden-sized and 5 intermediate-sized tensors (norm inputs
    and outputs, q/k/v, attention output, the MLP's gate, up, product and the LoRA inputs). With
    checkpointing only the block input is kept, plus one block's worth during recomputation.
    """
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    block = 2.0 * (14 * hidden + 5 * inter)
    if mode == "fast":
        return layers * block
    if mode == "lean":
        return layers * 2.0 * hidden + block
    return block  # offload: the block inputs live in CPU memory


def plan_speed(memory_mode: str, max_tokens: int | None, fused_kernels: str, config: Any, device: str,
               compute_dtype: Any, longest_sample: int, free_bytes: int | None = None) -> SpeedPlan:
    """Resolve the `auto` choices for this model on this device."""
    import torch

    notes: list[str] = []
    on_gpu = device.startswith("cuda")
    if on_gpu and free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    mode = memory_mode
    if mode == "auto":
        mode = "fast"
        if on_gpu:
            budget = max_tokens or DEFAULT_MAX_TOKENS
            for candidate in ("fast", "lean", "offload"):
                need = SAFETY * activation_bytes_per_token(config, candidate) * budget
                mode = candidate
                if need <= free_bytes:
                    break
            notes.append(f"{free_bytes / 2**30:.1f} GiB free")
    if max_tokens is None:
        if on_gpu:
            fits = int(free_bytes / (SAFETY * activation_bytes_per_token(config, mode)))
            max_tokens = max(longest_sample, min(DEFAULT_MAX_TOKENS, fits))
        else:
            max_tokens = 0  # the CPU gains nothing from large batches: batch by samples
    elif max_tokens and max_tokens < longest_sample:
        raise UserError(f"--max_tokens_per_batch {max_tokens} is below the longest sample ({longest_sample} tokens); "
                        "raise it or lower --max_seq_len.")
    fused = resolve_fused_kernels(fused_kernels, on_gpu, notes)
    autocast = compute_dtype if on_gpu and compute_dtype in (torch.bfloat16, torch.float16) else None
    return SpeedPlan(mode, max_tokens, fused, autocast, notes)


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_fused_kernels(choice: str, on_gpu: bool, notes: list[str]) -> str:
    if choice == "off":
        return "off"
    if choice == "liger":
        if not on_gpu:
            raise UserError("--fused_kernels liger needs a CUDA GPU; use auto or off on the CPU.")
        if not liger_available():
            raise UserError("--fused_kernels liger: the liger-kernel package is not installed "
                            "(pip install liger-kernel), or use auto/off.")
        return "liger"
    if on_gpu and liger_available():
        return "liger"
    notes.append("liger-kernel not used: " + ("no CUDA GPU" if not on_gpu else "not installed"))
    return "off"


# The functions _patch_rope replaced, by module, so remove_fused_kernels can put them back.
_ORIGINAL_ROPE: dict[str, Any] = {}
_ROPE_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
                 "cnqlora.baichuan")
# Marks the instance forwards apply_fused_kernels sets, so only those are removed again.
_FUSED = "_cnqlora_fused"


def apply_fused_kernels(model) -> int:
    """Swap eager RMSNorm, SwiGLU MLP and RoPE for Liger's fused kernels; return modules patched.

    RMSNorm and MLP are patched on this model's instances (not classes), so no other model
    changes, and the swap works for every LLaMA-shaped block (Baichuan, Qwen2, LLaMA) whatever its
    class is called. RoPE is a module-level function the attention looks up at call time: it is
    swapped in the modeling modules themselves, so for every model in the process, until
    remove_fused_kernels.
    """
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "weight"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

            def rms_forward(self, hidden_states, _eps=eps):
                return LigerRMSNormFunction.apply(hidden_states, self.weight, _eps, 0.0, "llama", False)

            setattr(rms_forward, _FUSED, True)
            module.forward = types.MethodType(rms_forward, module)
            patched += 1
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            def mlp_forward(self, x):
                return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

            setattr(mlp_forward, _FUSED, True)
            module.forward = types.MethodType(mlp_forward, module)
            patched += 1
    patched += _patch_rope()
    return patched


def _patch_rope() -> int:
    """Point the attention modules' apply_rotary_pos_emb at Liger's fused RoPE."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    count = 0
    for module_name in _ROPE_MODULES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "apply_rotary_pos_emb"):
            # setdefault: a second patch must not record Liger's function as the original.
            _ORIGINAL_ROPE.setdefault(module_name, module.apply_rotary_pos_emb)
            module.apply_rotary_pos_emb = liger_rotary_pos_emb
            count += 1
    return count


def remove_fused_kernels(model=None) -> int:
    """Undo apply_fused_kernels: the original RoPE for the whole process and, on `model`, the eager
    RMSNorm and MLP forwards. Return the number of modules restored; safe when nothing was patched.

    Without `model` only RoPE is restored: a freshly built model has no fused forwards, but would
    still run Liger's RoPE after an earlier model was patched.
    """
    restored = 0
    for module_name, original in list(_ORIGINAL_ROPE.items()):
        module = sys.modules.get(module_name)
        if module is not None:
            module.apply_rotary_pos_emb = original
            restored += 1
        del _ORIGINAL_ROPE[module_name]
    for module in model.modules() if model is not None else ():
        forward = module.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", None), _FUSED, False):
            del module.forward
            restored += 1
    return restored


def step_context(plan: SpeedPlan, device: str):
    """Autocast and (in offload mode) saved-tensor offloading around a forward pass."""
    import torch

    stack = contextlib.ExitStack()
    if plan.autocast_dtype is not None:
        stack.enter_context(torch.autocast(device_type="cuda", dtype=plan.autocast_dtype))
    if plan.memory_mode == "offload":
        # pinned memory makes the copies back asynchronous; it needs a CUDA runtime
        stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
    return stack

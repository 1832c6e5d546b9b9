"""DeepSpeed ZeRO-1/2 through accelerate, as the training loop's data parallelism.

`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml baichuan_qlora.py ...`
trains the same steps as plain DDP (`distributed`): the loop keeps what makes N processes train
exactly what one process trains (the token-mean loss over all ranks, micro-batches dealt by
padded tokens, skipped non-finite updates, its own schedule and resume), and DeepSpeed's engine
reduces the gradients into per-rank partitions and runs the optimizer on each rank's partition.

How the loop and the engine fit together:

- every rank runs a different number of micro-batches per step (`distributed.deal` balances
  tokens, not counts), while ZeRO-2 normally reduces gradients in every backward pass, a
  collective that would then be entered a different number of times per rank. The micro-batches
  of one step are therefore accumulated inside `engine.coalesce_grad_reduction()` (DeepSpeed
  0.19.1 and later), which reduces once when the block ends, like DDP's `no_sync`;
- the engine's gradient accumulation is one block per optimizer step, its clipping is
  `--max_grad_norm`, and an update whose gradient is not finite is skipped by the engine (its
  overflow check), which the loop's guard then counts as it does without DeepSpeed;
- Adam's moments live in per-rank partitions of a flat buffer. A checkpoint stores them whole,
  in the layout of a plain `torch.optim.AdamW` over the LoRA weights (`full_optimizer_state`),
  so a run resumes under DeepSpeed, DDP or one process, on any number of ranks
  (`load_optimizer_state` cuts the whole moments back into this rank's partition).

What is refused before a model loads (`check_config`): ZeRO-3 and parameter offload (the 4-bit
base cannot be partitioned, and need not be: it is frozen), optimizer offload (the LoRA Adam
state is a few MB per GPU), DeepSpeed's own fp16/bf16 (it would cast the model; the loop's
--compute_dtype autocasts instead), and a gradient_accumulation_steps or gradient_clipping in the
DeepSpeed config that contradicts the loop's options.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import UserError

MIN_VERSION = "0.19.1"  # the first release with DeepSpeedEngine.coalesce_grad_reduction
MOMENTS = ("exp_avg", "exp_avg_sq")
# DeepSpeed's default reduce and all-gather buckets (5e8 elements) are 2 GB of fp32 each; the LoRA
# weights are far fewer than that, so the buckets are cut to their size (at least this many).
MIN_BUCKET = 1 << 20


def requested() -> bool:
    """accelerate launch was given a DeepSpeed config (distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def check_installed() -> None:
    try:
        import deepspeed
    except ImportError:
        raise UserError("accelerate was launched with DeepSpeed (distributed_type: DEEPSPEED) but deepspeed is not "
                        f"installed: pip install 'deepspeed>={MIN_VERSION}' (or launch with configs/accelerate/"
                        "ddp.yaml: plain data parallelism trains the same steps).") from None
    from packaging.version import Version

    if Version(deepspeed.__version__.split("+")[0]) < Version(MIN_VERSION):
        raise UserError(f"deepspeed {deepspeed.__version__} is installed; this training loop needs {MIN_VERSION} or "
                        f"later (coalesce_grad_reduction): pip install -U 'deepspeed>={MIN_VERSION}'.")


def _given(value: Any) -> bool:
    return value not in (None, "auto")


def check_config(config: dict[str, Any], max_grad_norm: float, source: str) -> None:
    """Refuse DeepSpeed settings this loop cannot honour; `source` names where they came from."""
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    if stage not in (1, 2):
        why = ("partitions the parameters, and the frozen 4-bit base cannot be partitioned (nor does it need to be)"
               if stage == 3 else "is plain data parallelism: configs/accelerate/ddp.yaml does that")
        raise UserError(f"{source}: zero_stage {stage} is not supported: ZeRO-{stage} {why}. Use zero_stage 2 "
                        "(configs/accelerate/deepspeed_zero2.yaml) or 1.")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise UserError(f"{source}: {key} to {device} is not supported: the LoRA weights' optimizer state is a few "
                            f"MB per GPU, so offloading it saves nothing. Set {key}_device: none.")
    for key in ("fp16", "bf16"):
        if (config.get(key) or {}).get("enabled") in (True, "true"):
            raise UserError(f"{source}: DeepSpeed {key} (mixed_precision: {key}) is not supported: it would cast the "
                            "model. Set mixed_precision: 'no'; the training loop autocasts to --compute_dtype itself.")
    accumulation = config.get("gradient_accumulation_steps")
    if _given(accumulation) and int(accumulation) != 1:
        raise UserError(f"{source}: gradient_accumulation_steps {accumulation}: accumulation is the training loop's "
                        f"(--gradient_accumulation_steps {accumulation}); remove it from the DeepSpeed config.")
    clipping = config.get("gradient_clipping")
    if _given(clipping) and float(clipping) != float(max_grad_norm):
        raise UserError(f"{source}: gradient_clipping {clipping} but --max_grad_norm {max_grad_norm}: the loop's option "
                        "decides; remove gradient_clipping from the DeepSpeed config or give the same value.")


def configure(config: dict[str, Any], micro_batch: int, world_size: int, max_grad_norm: float,
              trainable: int) -> None:
    """Fill in what DeepSpeed asks for: one accumulation block per optimizer step, the loop's
    clipping, nominal batch sizes (micro-batches are token-budgeted; these only feed DeepSpeed's
    bookkeeping), and buckets of the LoRA weights' size."""
    config.update(train_micro_batch_size_per_gpu=micro_batch, train_batch_size=micro_batch * world_size,
                  gradient_accumulation_steps=1, gradient_clipping=float(max_grad_norm))
    config.setdefault("steps_per_print", float("inf"))
    zero = config.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if not _given(zero.get(key)):
            zero[key] = int(min(5e8, max(trainable, MIN_BUCKET)))


def _fragments(zero_optimizer, params: list) -> list[tuple[Any, int, int, int] | None]:
    """For each parameter, where this rank's share of it lies: (flat partition, start in the
    parameter, start in the partition, length); None when the partition holds none of it."""
    located: dict[int, tuple[Any, int, int, int] | None] = {}
    for group, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
        for p in group:
            m = getattr(p, "_hp_mapping", None)
            located[id(p)] = None if m is None else (flat, m.lp_fragment_address.start, m.hp_fragment_address.start,
                                                     m.lp_fragment_address.numel)
    missing = [i for i, p in enumerate(params) if id(p) not in located]
    if missing:
        raise RuntimeError(f"DeepSpeed's optimizer does not hold trainable parameter(s) {missing[:5]}")
    return [located[id(p)] for p in params]


def full_optimizer_state(engine, params: list) -> dict[str, Any]:
    """The whole AdamW state, as `torch.optim.AdamW(params).state_dict()` would give it (a
    collective: every rank calls it, every rank gets it)."""
    import torch
    import torch.distributed as dist

    zero = engine.optimizer
    inner = zero.optimizer
    where = _fragments(zero, params)
    sizes = [p.numel() for p in params]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    device = zero.single_partition_of_fp32_groups[0].device
    whole = torch.zeros(len(MOMENTS), sum(sizes), dtype=torch.float32, device=device)
    step = torch.zeros(1, dtype=torch.float64, device=device)
    for j, loc in enumerate(where):
        state = inner.state.get(loc[0]) if loc else None
        if not state:
            continue
        flat, lp_start, hp_start, n = loc
        for k, key in enumerate(MOMENTS):
            whole[k, offsets[j] + lp_start:offsets[j] + lp_start + n] = state[key][hp_start:hp_start + n]
        step[0] = max(float(step[0]), float(state["step"]))
    # Each element lies in exactly one rank's partition: the sum over ranks is the whole.
    dist.all_reduce(whole)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    group["params"] = list(range(len(params)))
    state: dict[int, dict[str, Any]] = {}
    if float(step[0]) > 0:  # no update applied yet: AdamW has no state either
        whole = whole.cpu()
        for j, p in enumerate(params):
            state[j] = {"step": torch.tensor(float(step[0]))}
            for k, key in enumerate(MOMENTS):
                state[j][key] = whole[k, offsets[j]:offsets[j] + sizes[j]].reshape(p.shape).clone()
    return {"state": state, "param_groups": [group]}


def load_optimizer_state(engine, saved: dict[str, Any], params: list) -> None:
    """Put a whole AdamW state (a checkpoint's, from any launcher) into this rank's partitions."""
    import torch

    zero = engine.optimizer
    inner = zero.optimizer
    if len(saved["param_groups"]) != 1 or len(inner.param_groups) != 1:
        raise UserError("the checkpoint's optimizer has several parameter groups; this training loop writes one.")
    if len(saved["param_groups"][0]["params"]) != len(params):
        raise UserError(f"the checkpoint's optimizer holds {len(saved['param_groups'][0]['params'])} tensors, this "
                        f"model {len(params)} LoRA weights: it was written with other LoRA settings.")
    for key, value in saved["param_groups"][0].items():
        if key != "params":
            inner.param_groups[0][key] = value
    if not saved["state"]:
        return
    step = saved["state"][0]["step"]
    for flat in zero.single_partition_of_fp32_groups:
        state = inner.state[flat]
        state["step"] = torch.as_tensor(step).detach().clone().to(torch.float32)
        for key in MOMENTS:
            state[key] = torch.zeros_like(flat)
    for j, loc in enumerate(_fragments(zero, params)):
        if loc is None:
            continue
        flat, lp_start, hp_start, n = loc
        for key in MOMENTS:
            source = saved["state"][j][key].reshape(-1)[lp_start:lp_start + n]
            inner.state[flat][key][hp_start:hp_start + n].copy_(source)

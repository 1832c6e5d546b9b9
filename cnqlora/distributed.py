"""Several processes, one training: who is who, how a step's micro-batches are dealt, and how
the ranks agree.

`accelerate launch --num_processes N` and `torchrun --nproc_per_node N` start N copies of the
training command with RANK / WORLD_SIZE / LOCAL_RANK set. Each copy loads the 4-bit base on its
own device; accelerate creates the process group and wraps the model for data parallelism, so
LoRA gradients are averaged by DDP itself. What this module adds is what makes N processes train
exactly what one process would:

- every rank knows the whole seeded micro-batch stream (`batching`), so each optimizer step's
  micro-batches, and their answer-token count, are known everywhere without communication;
  `deal` hands them out so that each rank gets a similar number of padded tokens;
- anything that can fail on input, or that writes shared files (the run lock, recovering
  folders, preparing data, the tokenisation cache), runs on rank 0 first (`World.main_first`):
  a failure there is reported once and ends every rank with the same exit code;
- a collective that fails because a rank died becomes a message, not a hang (`World.lost`).

Launched with a DeepSpeed config, the ranks train the same steps through DeepSpeed's ZeRO engine
instead of DDP (`zero`). The world's own collectives go through torch.distributed directly: under
DeepSpeed on the CPU accelerate reports every rank as rank 0 of 1.

Without those variables (or with WORLD_SIZE=1) the world is one process and nothing here talks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from . import zero
from .errors import EchoedError, UserError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800


def launched_size() -> int:
    """How many processes the launcher started (1 when not launched by torchrun/accelerate)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def deal(costs: list[int], size: int) -> list[list[int]]:
    """For each rank, the positions (into `costs`) of the micro-batches it computes.

    Largest first, each to the rank with the least work so far: with length-grouped token-budget
    batches every rank ends up within one micro-batch of the same padded-token count, so no rank
    waits long at the gradient all-reduce. Ties go by position, so every rank computes the same
    hands without talking. A rank may get no micro-batch at all (fewer micro-batches per step
    than ranks, after a resume on more processes); it still joins the all-reduce with a zero
    gradient. Each hand is in stream order.
    """
    loads = [0] * size
    hands: list[list[int]] = [[] for _ in range(size)]
    for m in sorted(range(len(costs)), key=lambda m: (-costs[m], m)):
        r = min(range(size), key=lambda r: (loads[r], len(hands[r]), r))
        hands[r].append(m)
        loads[r] += costs[m]
    return [sorted(h) for h in hands]


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    accelerator: Any = None
    deepspeed: bool = False
    # the DeepSpeed engine, once `wrap` made it
    engine: Any = field(default=None, repr=False)
    _long_group: Any = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, requested: str) -> str:
        """The device of this rank: its own GPU (LOCAL_RANK) when training on GPUs."""
        from .models import resolve_device

        device = resolve_device(requested)
        if not device.startswith("cuda") or (not self.distributed and self.local_rank == 0):
            return device
        import torch

        if device != "cuda":
            raise UserError(f"--device {device}: with several processes each uses its own GPU; use --device auto "
                            "or cuda.")
        if torch.cuda.device_count() <= self.local_rank:
            raise UserError(f"{self.size} processes on this machine but {torch.cuda.device_count()} GPU(s) visible: "
                            "start at most one process per GPU (--num_processes / --nproc_per_node).")
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    # ------------------------------------------------------------------ talking

    def lost(self, error: BaseException, doing: str) -> UserError:
        """The message for a collective that failed: another rank died or stopped."""
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return UserError(f"rank {self.rank} of {self.size}: lost the other ranks while {doing} ({detail[:200]}). "
                         "Another rank stopped or died: see its message. The newest complete checkpoint is kept; "
                         "continue with --resume_from_checkpoint auto.")

    @contextlib.contextmanager
    def talking(self, doing: str):
        """Turn a failed collective into `lost`'s message."""
        import torch.distributed as dist

        try:
            yield
        except dist.DistError as e:
            raise self.lost(e, doing) from None
        except RuntimeError as e:
            # DDP's reducer reports a dead peer as a plain RuntimeError from inside backward().
            if not self.distributed or not any(w in str(e) for w in ("Connection", "Gloo", "NCCL", "gloo", "nccl",
                                                                     "timed out", "Timed out", "peer")):
                raise
            raise self.lost(e, doing) from None

    def broadcast(self, value: Any, doing: str = "sharing rank 0's decision") -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        holder = [value]
        with self.talking(doing):
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any, doing: str = "gathering results") -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        with self.talking(doing):
            dist.all_gather_object(out, value)
        return out

    def sum(self, values: list[float], doing: str = "adding up the ranks' numbers") -> list[float]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        # NCCL reduces only tensors on the rank's GPU; gloo those in host memory.
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        with self.talking(doing):
            dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self, doing: str = "waiting for the other ranks") -> None:
        if self.distributed:
            import torch.distributed as dist

            with self.talking(doing):
                dist.barrier()

    def wait_long(self, doing: str) -> None:
        """A barrier without the short collective timeout (ranks that each train a whole run).

        It goes through a gloo group of its own with a timeout of days: a rank that dies closes
        its connections, which ends the wait at once with `lost`'s message.
        """
        if not self.distributed:
            return
        import torch.distributed as dist

        if self._long_group is None:
            with self.talking(doing):
                self._long_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
        with self.talking(doing):
            dist.barrier(group=self._long_group)

    def main_first(self, fn: Callable[[], T], others: bool = True, doing: str = "preparing") -> T:
        """Run `fn` on rank 0, then (with `others`) on the other ranks; without it they get rank 0's result.

        A UserError on rank 0 ends every rank with its exit code, said once (by rank 0); the
        others wait, so what rank 0 writes (a prepared data set, a cache, a recovered folder)
        is complete when they read it.
        """
        if not self.distributed:
            return fn()
        if self.main:
            try:
                result = fn()
            except UserError as e:
                self.broadcast(("error", str(e), e.exit_code), doing)
                raise
            except BaseException as e:
                self.broadcast(("error", f"rank 0 failed while {doing}: {type(e).__name__}: {e}", 1), doing)
                raise
            self.broadcast(("ok", None if others else result, 0), doing)
            return result
        kind, payload, code = self.broadcast(None, doing)
        if kind == "error":
            raise EchoedError(payload, code)
        return fn() if others else payload

    # ------------------------------------------------------------------ one optimizer step

    def wrap(self, module, optimizer, max_grad_norm: float, micro_batch: int):
        """`module` for data-parallel training: DDP through accelerate (gradients of trainable
        parameters only: the 4-bit base is frozen and identical on every rank, not broadcast), or
        DeepSpeed's engine, which then also owns `optimizer`'s update (`update`)."""
        if not self.distributed:
            return module
        if self.deepspeed:
            params = [p for p in module.parameters() if p.requires_grad]
            zero.configure(self.accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch, self.size,
                           max_grad_norm, sum(p.numel() for p in params))
            self.engine, _ = self.accelerator.prepare(module, optimizer)
            return self.engine
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in module.named_buffers()]
        module._ddp_params_and_buffers_to_ignore = frozen
        # The model is already on this rank's device (loaded there in 4-bit: it cannot be moved).
        return self.accelerator.prepare_model(module, device_placement=False)

    def accumulating(self):
        """Around all of one step's micro-batches: under DeepSpeed the gradients are reduced once,
        when the block ends (ranks may run different numbers of micro-batches)."""
        return self.engine.coalesce_grad_reduction() if self.engine is not None else contextlib.nullcontext()

    def no_sync(self, module, sync: bool):
        """DDP: accumulate without the gradient all-reduce unless `sync` (the step's last micro-batch)."""
        if not self.distributed or sync or self.engine is not None:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def backward(self, loss) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def update(self, params: list, optimizer, max_norm: float, allows: Callable[[float], bool]) -> float:
        """Clip the step's gradient to `max_norm`, apply it if `allows(its norm)`, and return the norm.

        Under DeepSpeed the engine clips, skips an update whose gradient is not finite and zeroes
        the gradients itself; `allows` then only keeps count (it says no exactly when the engine
        skipped: a norm that is not finite).
        """
        import math

        import torch

        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float("inf") if norm is None else float(norm)
            allows(norm)
            return norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
        if allows(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state(self, optimizer, params: list) -> dict[str, Any] | None:
        """The optimizer's whole state (a collective under DeepSpeed; None on ranks that do not write)."""
        if self.engine is not None:
            state = zero.full_optimizer_state(self.engine, params)
            return state if self.main else None
        return optimizer.state_dict() if self.main else None

    def load_optimizer_state(self, optimizer, saved: dict[str, Any], params: list) -> None:
        if self.engine is not None:
            zero.load_optimizer_state(self.engine, saved, params)
        else:
            optimizer.load_state_dict(saved)

    def check_options(self, max_grad_norm: float) -> None:
        """Refuse a DeepSpeed config the loop cannot honour, before any model is loaded."""
        if self.deepspeed:
            plugin = self.accelerator.state.deepspeed_plugin
            source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate config's deepspeed_config"
            zero.check_config(plugin.deepspeed_config, max_grad_norm, source)


_WORLD: World | None = None


def current_world(timeout_s: int = DEFAULT_TIMEOUT_S) -> World:
    """This process's world; the first call with several processes joins the process group."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    check_launch_plugins()
    size = launched_size()
    if size == 1:
        return World()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    import torch.distributed as dist

    deepspeed = zero.requested()
    # DeepSpeed runs on the CPU through its own CPU accelerator, which accelerate's cpu mode would bypass.
    on_cpu = not torch.cuda.is_available() and not deepspeed
    # Every LoRA weight gets a gradient in every step (with or without activation checkpointing),
    # so DDP need not search the graph for unused parameters.
    accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=[
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s)),
        DistributedDataParallelKwargs(find_unused_parameters=False)])
    if deepspeed:
        import logging

        import warnings

        # DeepSpeed logs its whole configuration and every step's bookkeeping at INFO, and its
        # all-gather warns of a deprecated torch name in every step.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", accelerator.local_process_index)),
                   accelerator=accelerator, deepspeed=deepspeed)
    if not _WORLD.main:
        # Rank 0 shows the run; N copies of the weight-loading bars would only bury its lines.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return _WORLD


def check_launch_plugins() -> None:
    """Refuse launcher modes the loop does not run, before any model is loaded."""
    if zero.requested():
        zero.check_installed()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise UserError("accelerate FSDP is not supported by this training loop: the LoRA weights are small, so "
                        "plain data parallelism (configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 "
                        "(configs/accelerate/deepspeed_zero2.yaml) is what QLoRA needs.")

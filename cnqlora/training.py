"""The training loop: data -> 4-bit base + LoRA -> adapter, with checkpoints that really resume.

One run lives in `checkpoint/<run_name>/`:

    adapter_model/       the final PEFT adapter (safetensors), tokenizer, train_config.yaml
    best_adapter/        with eval_f1_steps: the adapter of the best dev F1, dev_metrics.json
    checkpoints/step-N/  adapter + optimizer, scheduler, RNG states and the step (resume points)
    tb/                  TensorBoard logs
    metrics.jsonl        every logged value, one JSON object per line
    loss.png             train and dev loss curves

With average_seeds, `checkpoint/<run_name>/` holds one such run per seed (`seed-N/`) and
`average_adapter/`: the mean of their adapters (`adapters.average_adapters`), with its dev F1
beside the members' in `average_adapter/dev_metrics.json`.

Micro-batches come from a stream that depends only on the seed (`batching.BatchStream`), and
optimizer step k consumes micro-batches [k * G, (k + 1) * G) of it, G = accum x the number of
processes (several processes share each step's micro-batches: `distributed`). The step number
alone therefore fixes the data position, and a resumed run replays exactly the batches (and,
with the RNG states restored, the dropout masks) that the uninterrupted run would have seen.
How a step runs fast (memory mode, token budget, kernels, autocast) is `speed`'s concern.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

from .config import dump_yaml, opt
from .data import IGNORE_INDEX, PromptArgs, load_records, resolve_template, tokenize_records
from .errors import Stopped, UserError
from .models import LoraArgs, ModelArgs
from .batching import BatchStream, plan_by_tokens
from .distributed import DEFAULT_TIMEOUT_S, World, current_world, deal
from .runs import (atomic_dir, check_writable, describe_os_error, find_resume_point, list_checkpoints,
                   read_checkpoint, recover_atomic_dirs, run_lock)
from .speed import FUSED_KERNELS, MEMORY_MODES, apply_fused_kernels, plan_speed, step_context

SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class DataArgs:
    """Data"""

    train_file: str = opt("data/msra/train.txt", "training data: JSON Lines (or a JSON array) of instruction records")
    dev_file: str | None = opt("data/msra/dev.txt", "data for the eval loss during training; none to skip")
    max_seq_len: int = opt(256, "longest sample in tokens; longer samples lose the end of their query, never "
                           "their answer")
    skip_bad_lines: bool = opt(False, "train on the good records of a file with bad ones (they are listed)")
    max_train_samples: int | None = opt(None, "use only the first N training records")
    max_dev_samples: int | None = opt(1000, "use only N dev records for the eval loss, evenly spread over the file")
    prepare_msra_if_missing: bool = opt(False, "when train_file is missing, build the MSRA files in its folder "
                                        "(python dataset.py --prepare msra)")
    prepare_msra_join_lists: int = opt(0, "with prepare_msra_if_missing: also build train_joined.txt, as "
                                       "dataset.py --prepare msra --join_lists N (0: not)")


@dataclass
class TrainArgs:
    """Training"""

    output_dir: str = opt("checkpoint", "folder that holds the runs")
    run_name: str = opt("baichuan", "the run's folder inside output_dir; the adapter goes to "
                        "<output_dir>/<run_name>/adapter_model")
    num_epochs: float = opt(1.0, "passes over the training data")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides num_epochs)")
    batch_size: int = opt(64, "samples per micro-batch when batching by samples (the seed's 64)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    learning_rate: float = opt(2e-4, "peak learning rate of the LoRA weights")
    lr_scheduler: str = opt("cosine", "learning-rate decay after warm-up", choices=SCHEDULERS)
    warmup_ratio: float = opt(0.03, "share of the steps spent warming up linearly from 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this; 0 disables clipping")
    seed: int = opt(42, "seed of data order, LoRA initialisation and dropout")
    logging_steps: int = opt(10, "log the train loss every N steps")
    eval_steps: int = opt(200, "compute the dev loss every N steps (and at the end); 0 disables")
    eval_f1_steps: int = opt(0, "every N steps (and at the end) answer eval_f1_samples dev records with greedy "
                             "decoding and score entity-level F1; the best adapter is kept in <run>/best_adapter; "
                             "0 disables (NER data only)")
    eval_f1_samples: int = opt(500, "dev records answered for the dev F1, evenly spread over the dev records")
    eval_max_new_tokens: int = opt(96, "longest generated answer for the dev F1")
    save_steps: int = opt(200, "write a resumable checkpoint every N steps; 0 disables")
    save_total_limit: int = opt(2, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = opt(None, "continue a run: a checkpoint folder, or auto for the newest "
                                             "one of this run")
    memory_mode: str = opt("auto", "fast: keep all activations; lean: recompute each block in the backward pass "
                           "(activation checkpointing: far less memory, ~1/3 more compute); offload: lean + block "
                           "inputs in CPU memory; auto: the fastest that fits the GPU's free memory", choices=MEMORY_MODES)
    max_tokens_per_batch: int | None = opt(None, "fill micro-batches with length-grouped samples up to this many "
                                           "(padded) tokens instead of batch_size samples; default: from the "
                                           "memory mode and free memory on a GPU, off on the CPU; 0 = off")
    fused_kernels: str = opt("auto", "Liger-Kernel's fused RMSNorm, SwiGLU and RoPE; auto: when installed and a "
                             "CUDA GPU is present", choices=FUSED_KERNELS)
    tensorboard: bool = opt(True, "write TensorBoard logs to <run>/tb")
    average_seeds: list[int] = opt([], "train one run per seed (<run>/seed-N), then write the mean of their "
                                   "adapters (each its best by dev F1 when eval_f1_steps is on) to "
                                   "<run>/average_adapter and score it on the same dev F1 sample; e.g. 45,46,47,48. "
                                   "Empty: one run with --seed")
    ddp_timeout: int = opt(DEFAULT_TIMEOUT_S, "with several processes (accelerate launch, torchrun): seconds a rank "
                           "waits for the others at a collective before it stops with a message instead of hanging")
    create_tiny_model_if_missing: bool = opt(False, "when the model folder is missing, build a tiny random "
                                             "Baichuan-layout model there (the demo; shows the pipeline, not "
                                             "NER quality)")

    def validate(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1.")
        if self.max_steps is None and self.num_epochs <= 0:
            raise UserError("--num_epochs must be positive (or set --max_steps).")
        if self.average_seeds and (len(self.average_seeds) < 2 or len(set(self.average_seeds)) < len(self.average_seeds)):
            raise UserError(f"--average_seeds {','.join(map(str, self.average_seeds))}: give two or more different "
                            "seeds (an average of one seed, or of a seed with itself, is that seed's run).")
        if self.average_seeds and self.resume_from_checkpoint not in (None, "auto"):
            raise UserError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: with --average_seeds each seed "
                            "resumes its own run; use --resume_from_checkpoint auto.")


TRAIN_SECTIONS = [ModelArgs, PromptArgs, DataArgs, LoraArgs, TrainArgs]


# --------------------------------------------------------------------------- batches


def collate(samples: list[dict[str, list[int]]], pad_id: int):
    """Right-padded tensors; padding carries no label. The attention mask is for the plain path
    (`loss_sum(attention_mask=True)`); the fast path does not need it (see loss_sum)."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        labels[row, :n] = torch.tensor(s["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def labelled_tokens(batch: dict[str, Any]) -> int:
    # The first position is never a target: logits at t predict the token at t + 1.
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_sum(model, batch: dict[str, Any], attention_mask: bool = False):
    """Summed next-token cross-entropy over the labelled positions only.

    The LM head runs only where there is a label (about a tenth of the tokens for MSRA), which
    saves the memory and time of the full (batch, length, vocabulary) logits. Batches are
    right-padded, so by default no attention mask is passed: causal attention alone already
    keeps every real token from seeing padding (see cnqlora.speed), and PyTorch can then use
    its flash kernel.
    """
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch["attention_mask"] if attention_mask else None
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def eval_plan(lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Dev batches: sorted by length, cut by the token budget (or batch_size); order is irrelevant."""
    if not lengths:
        return []
    if max_tokens:
        return plan_by_tokens(lengths, max(max_tokens, max(lengths)), seed=0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_tokens(batch: list[int], lengths: list[int]) -> int:
    """The compute of a micro-batch: rows x longest row."""
    return len(batch) * max(lengths[i] for i in batch)


def evaluate_loss(model, samples, batches: list[list[int]], pad_id: int, device: str, plan=None,
                  attention_mask: bool = False, world: World | None = None) -> float:
    """Mean loss per answer token over the dev samples (attention_mask: see loss_sum).

    With several processes each rank computes its share of the batches and the sums are added up.
    """
    import contextlib

    import torch

    if world is not None and world.distributed:
        lengths = [len(s["input_ids"]) for s in samples]
        batches = [batches[i] for i in deal([padded_tokens(b, lengths) for b in batches], world.size)[world.rank]]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in batches:
            batch = {k: v.to(device) for k, v in collate([samples[i] for i in indices], pad_id).items()}
            with step_context(plan, device) if plan is not None else contextlib.nullcontext():
                total += float(loss_sum(model, batch, attention_mask))
            count += labelled_tokens(batch)
    if was_training:
        model.train()
    if world is not None and world.distributed:
        total, count = world.sum([total, count], "adding up the dev loss")
    return total / max(1, count)


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return schedule


# --------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, model, optimizer, scheduler, step: int, history: list[dict], limit: int,
                    world: World = World(), per_step: int | None = None) -> str:
    """Write the resume point of `step` (rank 0 writes, every rank's RNG state in it).

    The data position is the step times `per_step`, the micro-batches of one optimizer step over
    all ranks; both are stored so that a resume on another number of processes keeps it.
    """
    import torch

    dest = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
    rngs = world.gather(_rng_state(), "gathering every rank's RNG state for the checkpoint")
    # Under DeepSpeed each rank holds a part of Adam's moments: they are put together (on every
    # rank) into the plain AdamW layout, which any launcher and number of processes can resume.
    with world.talking("gathering the optimizer state for the checkpoint"):
        optimizer_state = world.optimizer_state(optimizer, [p for p in model.parameters() if p.requires_grad])
    if world.main:
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                     "rng": rngs[0], "history": history}
            if world.distributed:
                state.update(rng_ranks=rngs, world_size=world.size, micro_batches_per_step=per_step)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        for old in list_checkpoints(run_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    # The others wait: a rank that stops (a signal) must not exit while rank 0 is still writing,
    # or the launcher would take rank 0 down with it.
    world.barrier(f"waiting for rank 0 to write the checkpoint of step {step}")
    return dest


def load_checkpoint(checkpoint: tuple[str, dict[str, Any], dict[str, Any]], model, scheduler,
                    rank: int = 0) -> tuple[int, list[dict]]:
    """Put a checkpoint read by `runs.find_resume_point` into the model, scheduler and RNGs.

    The optimizer's state goes in once the model is wrapped for its launcher
    (`World.load_optimizer_state`: DeepSpeed partitions it then). A rank that the checkpoint has
    no RNG state for (a resume on more processes) gets a fresh one from the step and its rank, so
    its dropout differs from the other ranks'.
    """
    import torch
    from peft import set_peft_model_state_dict

    _, weights, state = checkpoint
    set_peft_model_state_dict(model, weights)
    scheduler.load_state_dict(state["scheduler"])
    saved = state.get("rng_ranks") or [state["rng"]]
    if rank < len(saved):
        _set_rng_state(saved[rank])
    else:
        torch.manual_seed(1_000_003 * rank + state["step"])
        random.seed(1_000_003 * rank + state["step"])
    return state["step"], state["history"]


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl + TensorBoard + the in-memory history that checkpoints carry."""

    def __init__(self, run_dir: str, history: list[dict], tensorboard: bool, start_step: int,
                 write: bool = True) -> None:
        """`write` false (the ranks other than 0): keep the history in memory only."""
        self.path = os.path.join(run_dir, "metrics.jsonl") if write else None
        self.history = [h for h in history if h["step"] <= start_step]
        self.writer = None
        if not write:
            return
        with open(self.path, "w", encoding="utf-8") as f:
            for h in self.history:
                f.write(json.dumps(h) + "\n")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from.
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, **values: float) -> None:
        entry = {"step": step, **values}
        self.history.append(entry)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def plot_losses(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("eval_loss", "dev")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def spread(items: list, n: int | None) -> list:
    """`n` items evenly spaced over `items` (all of them when n is unset or not smaller).

    Corpora come in runs of sentences from one document, so the first n cover few documents;
    spread over the file they sample all of them.
    """
    if not n or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def _prepare_inputs(model_args: ModelArgs, prompt_args: PromptArgs, data_args: DataArgs, train_args: TrainArgs,
                    log) -> tuple[list, list, dict]:
    """Everything that can fail on bad input, done before a model is loaded."""
    if not os.path.exists(data_args.train_file) and data_args.prepare_msra_if_missing:
        from .msra import prepare_msra

        log(f"{data_args.train_file} is missing: preparing the MSRA files in {os.path.dirname(data_args.train_file)}")
        prepare_msra(out_dir=os.path.dirname(data_args.train_file) or ".", join_lists=data_args.prepare_msra_join_lists)
        if not os.path.exists(data_args.train_file):
            # prepare_msra writes fixed names; say which option makes the one asked for
            raise UserError(f"{data_args.train_file}: not among the MSRA files just prepared (train.txt, dev.txt, "
                            "test.txt, and train_joined.txt when prepare_msra_join_lists is above 0); set "
                            "train_file to one of them")
    train_records = load_records(data_args.train_file, prompt_args.columns, data_args.skip_bad_lines)
    dev_records = []
    if data_args.dev_file:
        dev_records = load_records(data_args.dev_file, prompt_args.columns, data_args.skip_bad_lines)
    if data_args.max_train_samples:
        train_records = train_records[:data_args.max_train_samples]
    dev_records = spread(dev_records, data_args.max_dev_samples)
    if not os.path.exists(model_args.model_name_or_path) and train_args.create_tiny_model_if_missing:
        from .tiny import write_tiny_baichuan

        log(f"{model_args.model_name_or_path} is missing: building a tiny random Baichuan-layout model there "
            "(tokenizer trained on the training texts)")
        texts = [r["instruct"] + "\n" + r["query"] + "\n" + r["answer"] for r in train_records[:20000]]
        texts.append("Human: \n\n\nAssistant: \n")
        write_tiny_baichuan(model_args.model_name_or_path, texts, vocab_size=8000)
    from .models import check_model_folder

    config = check_model_folder(model_args.model_name_or_path, need_tokenizer=model_args.tokenizer_path is None,
                                trust_remote_code=model_args.trust_remote_code)
    return train_records, dev_records, config


def save_adapter(model, tokenizer, dest: str, resolved_config: str, extra_files: dict[str, str] | None = None) -> str:
    """A standard PEFT adapter folder (+ tokenizer, the run's config, extra files), replaced atomically."""
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in {"train_config.yaml": resolved_config, **(extra_files or {})}.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(content)
    return dest


def _dev_evaluator(tokenizer, template: str, train_records: list[dict], dev_records: list[dict], train_args: TrainArgs,
                   world: World | None = None):
    """The dev F1 of a run: the same records, types and length limit for every adapter it compares
    (with several ranks, each answers its share of the records)."""
    from .evaluation import DevNerEvaluator
    from .grounded import allowed_types_from_answers

    types = allowed_types_from_answers(r["answer"] for r in train_records) or None
    return DevNerEvaluator(tokenizer, template, spread(dev_records, train_args.eval_f1_samples), types,
                           max_new_tokens=train_args.eval_max_new_tokens, world=world)


def _dev_f1(evaluator, model, tokenizer, metrics: MetricsLog, step: int, run_dir: str, resolved: str,
            best_f1: float, best_step: int, say, world: World) -> tuple[float, int]:
    """Score the dev answers (each rank its share), log them, and keep the adapter if it is the best so far."""
    from .evaluation import dev_scalars

    result = evaluator(model)
    scalars = dev_scalars(result)
    metrics.log(step, **scalars)
    say(f"step {step}: dev F1 {100 * scalars['dev_f1']:.2f} (P {100 * scalars['dev_precision']:.2f}, "
              f"R {100 * scalars['dev_recall']:.2f}, unparseable {100 * scalars['dev_unparseable']:.1f}%)")
    if scalars["dev_f1"] > best_f1:
        if world.main:
            marker = json.dumps({"step": step, **result}, ensure_ascii=False, indent=2)
            save_adapter(model, tokenizer, os.path.join(run_dir, "best_adapter"), resolved,
                         {"dev_metrics.json": marker})
        return scalars["dev_f1"], step
    return best_f1, best_step


class _StopOnSignal:
    """Turn SIGINT and SIGTERM (a scheduler's preemption) into a checkpoint and a clean exit.

    The signal only sets a flag: the loop finishes the optimizer step it is in, writes a
    checkpoint and stops, so the run resumes exactly where it stopped. A second signal is not
    waited for: the previous handler is back (Ctrl-C then interrupts at once, SIGTERM kills).
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _restore(self, number: int) -> None:
        import signal

        # getsignal gives None for a handler set outside Python; the default is what it stood for.
        previous = self._previous[number]
        signal.signal(number, signal.SIG_DFL if previous is None else previous)

    def _handle(self, number: int, frame) -> None:
        import signal

        self.signal_name = signal.Signals(number).name
        self._restore(number)
        print(f"\n{self.signal_name}: stopping after this step (send it again to stop at once)", file=sys.stderr)

    def stop(self, message: str) -> None:
        import signal

        raise Stopped(message, 128 + int(getattr(signal, self.signal_name)))

    def __exit__(self, *exc) -> None:
        for number in self._previous:
            self._restore(number)


class _SkipGuard:
    """Decides whether an update with this gradient norm is applied.

    One bad batch must not turn every LoRA weight into NaN for the rest of the run: an update with
    a non-finite gradient is skipped, as loss scalers do, and the run stops only when such steps
    are no longer rare (20 in a row, or more than 10% after 50 steps).
    """

    def __init__(self) -> None:
        self.skipped = 0
        self.in_a_row = 0

    def allows(self, grad_norm: float, step: int, write: Callable[..., None]) -> bool:
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        write(f"step {step + 1}: gradient norm {grad_norm}, update skipped ({self.skipped} so far)", file=sys.stderr)
        if self.in_a_row >= 20 or (step >= 50 and self.skipped > 0.1 * (step + 1)):
            raise UserError(f"{self.skipped} of {step + 1} steps had non-finite gradients ({self.in_a_row} in a "
                            "row); lower --learning_rate, or use --compute_dtype bfloat16 if it is float16.")
        return False


class _LogWindow:
    """Train loss and throughput over the steps since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.finite = self.samples = self.steps = 0
        self.start = time.time()

    def add(self, step_loss: float, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        if math.isfinite(step_loss):  # a skipped step's loss would poison the mean
            self.loss += step_loss
            self.finite += 1

    def values(self) -> dict[str, float]:
        elapsed = max(time.time() - self.start, 1e-9)
        return {"train_loss": self.loss / max(1, self.finite), "train_samples_per_s": self.samples / elapsed,
                "train_steps_per_s": self.steps / elapsed}


def _loss_module(model):
    """What DDP wraps: a module whose forward is `loss_sum` of the PEFT model, so that each
    micro-batch goes through DDP's forward (which arms its gradient all-reduce)."""
    import torch

    class LossOf(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.model = inner

        def forward(self, batch):
            return loss_sum(self.model, batch)

    return LossOf(model)


def _forward_backward(model, batches: list[dict[str, Any]], device: str, plan, write: Callable[..., None],
                      step: int, indices: Callable[[int], list[int]], n_tokens: int, world: World = World(),
                      weight: float = 1.0) -> tuple[float, int]:
    """Accumulate the gradients of this rank's micro-batches of one optimizer step; return its
    share of the step's loss and its samples.

    The loss is summed over every labelled token of the step and divided once by their count
    (over all ranks), so a step's gradient does not depend on how its samples were split into
    micro-batches or dealt to ranks. With several ranks `model` is the DDP-wrapped (or DeepSpeed's)
    `_loss_module`: both average the ranks' gradients, so each rank's loss is scaled by their number to make
    that average the gradient of the whole step's sum. `weight` 0: a rank with no micro-batch
    in this step joins the all-reduce with a zero gradient.
    """
    step_loss, samples = 0.0, 0
    last = len(batches) - 1
    with world.accumulating():
        for m, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            with world.no_sync(model, sync=m == last):
                with step_context(plan, device):
                    loss = (model(batch) if world.distributed else loss_sum(model, batch)) / n_tokens
                if world.distributed:
                    loss = loss * (world.size * weight)
                world.backward(loss)
            micro_loss = loss.item() / world.size if world.distributed else loss.item()
            step_loss += micro_loss
            samples += batch["input_ids"].shape[0] if weight else 0
            if not math.isfinite(micro_loss):
                write(f"step {step + 1}: non-finite loss in micro-batch {m} (samples {indices(m)})", file=sys.stderr)
    return step_loss, samples


def train(model_args: ModelArgs, prompt_args: PromptArgs, data_args: DataArgs, lora_args: LoraArgs,
          train_args: TrainArgs, log: Callable[[str], None] = print,
          callbacks: list[Callable[..., None]] = (), world: World | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; return where its outputs are and its last losses.

    Each callback is called as callback(step=..., model=..., metrics=...) after every optimizer
    step, once that step's logging, evaluation and checkpoint are done. With average_seeds this
    trains every seed and averages them (`train_average`). Started by accelerate launch or
    torchrun, the N processes train one run together (data parallel; see cnqlora.distributed):
    rank 0 holds the folder and writes every output, the others only compute.
    """
    world = world or current_world(train_args.ddp_timeout)
    if train_args.average_seeds:
        return train_average(model_args, prompt_args, data_args, lora_args, train_args, log, callbacks, world)
    world.check_options(train_args.max_grad_norm)
    if not world.main:
        log = _quiet
    run_dir = os.path.join(train_args.output_dir, train_args.run_name)
    with contextlib.ExitStack() as held:
        claimed: dict[str, Any] = {}

        def claim() -> tuple[str, str | None]:
            check_writable(run_dir)
            held.enter_context(run_lock(run_dir))
            recover_atomic_dirs(run_dir, log)
            recover_atomic_dirs(os.path.join(run_dir, "checkpoints"), log)
            if train_args.resume_from_checkpoint == "auto" and _finished(run_dir):
                log(f"{run_dir} finished before (adapter_model is written): nothing to train. To train it again, "
                    "delete the folder or give the run another --run_name.")
                return "finished", None
            resume = None
            if train_args.resume_from_checkpoint:
                resume = find_resume_point(train_args.resume_from_checkpoint, run_dir, log)
                if resume is None:
                    log(f"no usable checkpoint in {run_dir}/checkpoints yet: starting from scratch")
            claimed["resume"] = resume
            return "train", resume[0] if resume else None

        # Only rank 0 locks and recovers the folder; the others learn what it found.
        outcome, resume_path = world.main_first(claim, others=False, doing="taking the run folder")
        if outcome == "finished":
            return _finished_result(run_dir)
        resume = claimed.get("resume")
        if not world.main and resume_path:
            resume = (resume_path, *read_checkpoint(resume_path))
        train_records, dev_records, model_config = world.main_first(
            lambda: _prepare_inputs(model_args, prompt_args, data_args, train_args, log), doing="reading the data")
        with _StopOnSignal() as stop:
            return _train_in(run_dir, resume, stop, train_records, dev_records, model_config, model_args,
                             prompt_args, data_args, lora_args, train_args, log, callbacks, world)


def _quiet(*_: Any, **__: Any) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _micro_batches_per_step(accum: int, world: World, resume, log: Callable[[str], None]) -> int:
    """Micro-batches of one optimizer step over all ranks: gradient_accumulation_steps per rank.

    A run resumed on another number of processes keeps its checkpoint's global batch, so it goes
    on training the same steps (same data position, schedule and batch); the ranks then share
    the step's micro-batches as evenly as `deal` can.
    """
    if resume:
        state = resume[2]
        saved_size = state.get("world_size", 1)
        if saved_size != world.size:
            per_step = state.get("micro_batches_per_step") or accum
            log(f"the checkpoint was written by {saved_size} process(es), this run has {world.size}: keeping its "
                f"{per_step} micro-batches per optimizer step (about {per_step / world.size:g} per process), so "
                "the run continues as it started")
            return per_step
    return accum * world.size


def _train_in(run_dir: str, resume, stop: "_StopOnSignal", train_records: list[dict], dev_records: list[dict],
              model_config: dict, model_args: ModelArgs, prompt_args: PromptArgs, data_args: DataArgs,
              lora_args: LoraArgs, train_args: TrainArgs, log: Callable[[str], None],
              callbacks: list[Callable[..., None]], world: World) -> dict[str, Any]:
    """train() once its run folder is held, checked and recovered."""
    import torch
    from tqdm.auto import tqdm

    from .models import attach_lora, count_parameters, load_model, load_tokenizer, resolve_dtype

    device = world.device(model_args.device)

    tokenizer = load_tokenizer(model_args.tokenizer_path or model_args.model_name_or_path, model_args.trust_remote_code)
    template = resolve_template(prompt_args.template, tokenizer, model_config.get("model_type"))
    # Shared by the runs of one output_dir; entries are keyed by data, tokenizer, template and length.
    cache_dir = os.path.join(train_args.output_dir, ".cache")
    # Rank 0 first: the others then read the cache it wrote instead of racing it.
    train_set, train_stats = world.main_first(
        lambda: tokenize_records(train_records, tokenizer, template, data_args.max_seq_len, cache_dir),
        doing="tokenizing the training data")
    log(train_stats.describe("train", data_args.max_seq_len))
    if train_stats.samples == 0:
        raise UserError(f"{data_args.train_file}: no sample fits in --max_seq_len {data_args.max_seq_len}.")
    dev_samples = []
    if dev_records:
        dev_set, dev_stats = world.main_first(
            lambda: tokenize_records(dev_records, tokenizer, template, data_args.max_seq_len, cache_dir),
            doing="tokenizing the dev data")
        log(dev_stats.describe("dev", data_args.max_seq_len))
        dev_samples = dev_set.to_list()
    samples = train_set.to_list()

    torch.manual_seed(train_args.seed)
    random.seed(train_args.seed)
    started = time.time()
    model = load_model(model_args, device)
    log(f"loaded {model_args.model_name_or_path} ({model_args.quantization}, "
        f"{next(p for p in model.parameters() if p.is_floating_point()).dtype}) on {device} in {time.time() - started:.1f}s")
    lengths = [len(x["input_ids"]) for x in samples]
    # Rank 0's plan for all: the token budget shapes the batch stream, which every rank must share.
    plan = world.main_first(lambda: plan_speed(train_args.memory_mode, train_args.max_tokens_per_batch,
                                               train_args.fused_kernels, model.config, device,
                                               resolve_dtype(model_args.compute_dtype, device), max(lengths)),
                            others=False, doing="choosing the memory mode")
    model, targets = attach_lora(model, lora_args, gradient_checkpointing=plan.memory_mode in ("lean", "offload"))
    if plan.fused_kernels == "liger":
        apply_fused_kernels(model)
    log(f"speed: {plan.describe()}")
    trainable, total = count_parameters(model)
    log(f"LoRA r={lora_args.lora_r} on {', '.join(targets)}: {trainable:,} trainable parameters "
        f"of {total:,} ({100 * trainable / total:.3f}%)")

    if world.distributed:
        # Same LoRA initialisation everywhere (seeded above), different dropout on each rank.
        torch.manual_seed(train_args.seed + 1_000_003 * world.rank)
        random.seed(train_args.seed + 1_000_003 * world.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_args.learning_rate, weight_decay=train_args.weight_decay)
    stream = BatchStream(lengths, train_args.seed, train_args.batch_size, plan.max_tokens)
    per_step = _micro_batches_per_step(train_args.gradient_accumulation_steps, world, resume, log)
    total_steps = train_args.max_steps or max(1, math.ceil(stream.total_micro_batches(train_args.num_epochs)
                                                          / per_step))
    warmup = int(train_args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_args.lr_scheduler, warmup, total_steps))

    step, history = 0, []
    if resume:
        # The weights go in before the model is wrapped: DeepSpeed copies them into its fp32 master
        # weights then.
        step, history = load_checkpoint(resume, model, scheduler, world.rank)
    trainer = world.wrap(_loss_module(model), optimizer, train_args.max_grad_norm,
                         train_args.batch_size) if world.distributed else model
    if resume:
        world.load_optimizer_state(optimizer, resume[2]["optimizer"], params)
        log(f"resumed from {resume[0]} at step {step}")
    answer_tokens = [sum(1 for t in x["labels"][1:] if t != IGNORE_INDEX) for x in samples]
    resolved = dump_yaml(model_args, prompt_args, data_args, lora_args, train_args)
    if world.main:
        with open(os.path.join(run_dir, "train_config.yaml"), "w", encoding="utf-8") as f:
            f.write(resolved)
    metrics = MetricsLog(run_dir, history, train_args.tensorboard, step, write=world.main)
    pad_id = tokenizer.pad_token_id
    eval_batches = eval_plan([len(x["input_ids"]) for x in dev_samples], train_args.batch_size, plan.max_tokens)
    evaluator = None
    if train_args.eval_f1_steps and dev_records:
        from .evaluation import best_so_far

        evaluator = _dev_evaluator(tokenizer, template, train_records, dev_records, train_args, world)
        best_f1, best_step = best_so_far(history)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not world.main)
    say = bar.write if world.main else _quiet
    guard, window = _SkipGuard(), _LogWindow()
    doing = "starting"
    try:
        if dev_samples and train_args.eval_steps and step == 0:
            # The starting point of the dev curve: what the base model scores before any update.
            metrics.log(0, eval_loss=evaluate_loss(model, dev_samples, eval_batches, pad_id, device, plan,
                                                   world=world))
        while step < total_steps:
            doing = f"training step {step + 1}"
            step_batches = [stream.batch(step * per_step + m) for m in range(per_step)]
            n_tokens = max(1, sum(answer_tokens[i] for b in step_batches for i in b))
            hand, weight = deal([padded_tokens(b, lengths) for b in step_batches], world.size)[world.rank], 1.0
            if not hand:
                hand, weight = [0], 0.0
            batches = [collate([samples[i] for i in step_batches[m]], pad_id) for m in hand]
            with world.talking(doing):
                step_loss, n_samples = _forward_backward(trainer, batches, device, plan, bar.write, step,
                                                         lambda j: step_batches[hand[j]], n_tokens, world, weight)
            if world.distributed:
                step_loss, n_samples = world.sum([step_loss, n_samples], doing)
                n_samples = int(n_samples)
            with world.talking(doing):
                grad_norm = world.update(params, optimizer, train_args.max_grad_norm,
                                         lambda norm: guard.allows(norm, step, say))
            with warnings.catch_warnings():
                # After a skipped update PyTorch warns that the scheduler stepped without the optimizer;
                # that is intended: the schedule follows the step count, as on resume.
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            step += 1
            window.add(step_loss, n_samples)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % train_args.logging_steps == 0 or step == total_steps:
                values = {**window.values(), "train_lr": scheduler.get_last_lr()[0]}
                if math.isfinite(grad_norm):
                    values["train_grad_norm"] = grad_norm
                if guard.skipped:
                    values["train_skipped_steps"] = guard.skipped
                if device.startswith("cuda"):
                    # the fullest GPU's, since a run fits only if every rank's does
                    peaks = world.gather(torch.cuda.max_memory_allocated() / 2**30, "gathering the peak GPU memory")
                    values["train_peak_gib"] = max(peaks)
                metrics.log(step, **values)
                window.reset()
            if dev_samples and train_args.eval_steps and (step % train_args.eval_steps == 0 or step == total_steps):
                eval_loss = evaluate_loss(model, dev_samples, eval_batches, pad_id, device, plan, world=world)
                metrics.log(step, eval_loss=eval_loss)
                say(f"step {step}: dev loss {eval_loss:.4f}")
            if evaluator is not None and (step % train_args.eval_f1_steps == 0 or step == total_steps):
                best_f1, best_step = _dev_f1(evaluator, model, tokenizer, metrics, step, run_dir, resolved,
                                             best_f1, best_step, say, world)
            saved = False
            if train_args.save_steps and step % train_args.save_steps == 0 and step < total_steps:
                doing = f"writing the checkpoint of step {step}"
                save_checkpoint(run_dir, model, optimizer, scheduler, step, metrics.history, train_args.save_total_limit,
                                world, per_step)
                saved = True
            for callback in callbacks:
                callback(step=step, model=model, metrics=metrics)
            if world.distributed and step < total_steps:
                # A signal reaches the ranks at different moments: they stop together, at the
                # first step end where any of them has it.
                signalled = world.gather(stop.signal_name, "checking for a stop signal")
                stop.signal_name = stop.signal_name or next((name for name in signalled if name), None)
            if stop.signal_name and step < total_steps:
                doing = f"writing the checkpoint of step {step} after {stop.signal_name}"
                if not saved:
                    save_checkpoint(run_dir, model, optimizer, scheduler, step, metrics.history,
                                    train_args.save_total_limit, world, per_step)
                stop.stop(f"{stop.signal_name} at step {step} of {total_steps}: checkpoint written to "
                          f"{os.path.join(run_dir, 'checkpoints', f'step-{step:06d}')}; continue with "
                          "--resume_from_checkpoint auto")
        doing = "writing the final adapter"
        adapter_dir = os.path.join(run_dir, "adapter_model")
        if world.main:
            save_adapter(model, tokenizer, adapter_dir, resolved)
            plot_losses(metrics.history, os.path.join(run_dir, "loss.png"))
        world.barrier("waiting for rank 0 to write the final adapter")
    except OSError as e:
        raise describe_os_error(e, run_dir, doing) from None
    finally:
        failing = sys.exc_info()[1]
        bar.close()
        try:
            metrics.close()
        except OSError as e:
            # TensorBoard flushes on close: into a deleted or full folder that fails too, and must
            # neither hide the message already on its way nor pass as a traceback.
            if failing is None:
                raise describe_os_error(e, run_dir, "closing the TensorBoard log") from None

    log(f"adapter saved to {adapter_dir}; loss curves in {os.path.join(run_dir, 'loss.png')}")
    best = None
    if evaluator is not None and best_step:
        best = {"dev_f1": best_f1, "step": best_step, "adapter_dir": os.path.join(run_dir, "best_adapter")}
        log(f"best dev F1 {100 * best_f1:.2f} at step {best_step}: {best['adapter_dir']}")
    return {"adapter_dir": adapter_dir, "run_dir": run_dir, "steps": step, **_losses(metrics.history),
            "template": template, "best": best, "trained": True}


# --------------------------------------------------------------------------- averaging seeds


def _free_accelerator_memory() -> None:
    # The next seed's memory mode is chosen from the GPU's free memory, so the last model must be gone.
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finished(run_dir: str) -> bool:
    # The final adapter is written (atomically) only once the last step is done.
    return os.path.isfile(os.path.join(run_dir, "adapter_model", "adapter_model.safetensors"))


def _finished_result(run_dir: str) -> dict[str, Any]:
    """What train() returns for a run that finished before, read back from its folder."""
    history = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            history = [json.loads(line) for line in f if line.strip()]
    best_dir = os.path.join(run_dir, "best_adapter")
    best = None
    if os.path.isfile(os.path.join(best_dir, "dev_metrics.json")):
        with open(os.path.join(best_dir, "dev_metrics.json"), encoding="utf-8") as f:
            marker = json.load(f)
        best = {"dev_f1": marker["micro"]["f1"], "step": marker["step"], "adapter_dir": best_dir}
    return {"adapter_dir": os.path.join(run_dir, "adapter_model"), "run_dir": run_dir,
            "steps": max((h["step"] for h in history), default=0), **_losses(history), "template": None,
            "best": best, "trained": False}


def _losses(history: list[dict]) -> dict[str, Any]:
    """The history and the losses train() reports from it."""
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {"history": history, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "last_eval_loss": evals[-1] if evals else None}


def _member_dev_f1(adapter_dir: str) -> dict[str, Any] | None:
    path = os.path.join(adapter_dir, "dev_metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        marker = json.load(f)
    return {"dev_f1": marker["micro"]["f1"], "step": marker["step"]}


def train_average(model_args: ModelArgs, prompt_args: PromptArgs, data_args: DataArgs, lora_args: LoraArgs,
                  train_args: TrainArgs, log: Callable[[str], None] = print,
                  callbacks: list[Callable[..., None]] = (), world: World = World()) -> dict[str, Any]:
    """Train the recipe once per seed of average_seeds, then average their adapters into one.

    Seeds of one recipe make different errors (an entity vote of three MSRA seeds beat each of
    them by more than a point), and the mean of their weight changes keeps much of that gain at
    the cost of one adapter. Each seed is a whole run in <run>/seed-N (resumable, with its own
    best adapter); with --resume_from_checkpoint, seeds that finished are not trained again. The
    average is scored on the same dev sample as the members and the two are compared in the log,
    since an average is only worth using when it beats them there.

    Launched on N processes (one per GPU), the seeds train side by side: rank r trains seeds
    r, r + N, ... as one-process runs on its own GPU, and rank 0 averages once all are done.
    """
    run_dir = os.path.join(train_args.output_dir, train_args.run_name)
    seeds = ",".join(map(str, train_args.average_seeds))
    # said up front: a --seed given for a one-seed run would otherwise go unused without a word
    say = log if world.main else _quiet
    say(f"average_seeds {seeds}: {len(train_args.average_seeds)} runs in {run_dir}/seed-N, then their mean in "
        f"{run_dir}/average_adapter; --seed is not used (for one run: --average_seeds '' --seed N)")
    if world.distributed:
        say(f"{world.size} processes: the seeds train side by side, one run per process at a time")
    train_records, dev_records, _ = world.main_first(
        lambda: _prepare_inputs(model_args, prompt_args, data_args, train_args, say), doing="reading the data")
    with contextlib.ExitStack() as held:
        def claim() -> None:
            check_writable(run_dir)
            held.enter_context(run_lock(run_dir))
            recover_atomic_dirs(run_dir, say)

        world.main_first(claim, others=False, doing="taking the run folder")
        return _train_average_in(run_dir, train_records, dev_records, model_args, prompt_args, data_args, lora_args,
                                 train_args, log, callbacks, world)


def _train_average_in(run_dir: str, train_records: list[dict], dev_records: list[dict], model_args: ModelArgs,
                      prompt_args: PromptArgs, data_args: DataArgs, lora_args: LoraArgs, train_args: TrainArgs,
                      log: Callable[[str], None], callbacks: list[Callable[..., None]],
                      world: World = World()) -> dict[str, Any]:
    """train_average() once its folder is held (each seed's run holds its own folder too)."""
    from .adapters import average_adapters

    # Each rank's seeds are plain one-process runs on its own device; rank 0 speaks for its own,
    # the others' lines carry their rank.
    alone = World(local_rank=world.local_rank)
    member_log = log if world.main else (lambda line: log(f"rank {world.rank}: {line}"))
    members, results = [], []
    for i, seed in enumerate(train_args.average_seeds, 1):
        args = replace(train_args, seed=seed, output_dir=run_dir, run_name=f"seed-{seed}", average_seeds=[])
        seed_dir = os.path.join(run_dir, args.run_name)
        best = os.path.join(seed_dir, "best_adapter")
        if (i - 1) % world.size != world.rank:
            members.append(best)  # decided below, once its rank has trained it
            continue
        if train_args.resume_from_checkpoint and _finished(seed_dir):
            member_log(f"seed {seed} ({i} of {len(train_args.average_seeds)}): finished before in {seed_dir}, not "
                       "trained again")
        else:
            member_log(f"seed {seed} ({i} of {len(train_args.average_seeds)}): training {seed_dir}")
            results.append(train(model_args, prompt_args, data_args, lora_args, args, member_log, callbacks, alone))
            _free_accelerator_memory()
        members.append(best)
    # A seed may take hours longer on one GPU than on another: this wait has no short timeout.
    world.wait_long("waiting for the other processes' seeds")
    members = [m if os.path.isdir(m) else os.path.join(os.path.dirname(m), "adapter_model") for m in members]
    if not world.main:
        world.wait_long("waiting for rank 0 to average the seeds")
        return {"adapter_dir": os.path.join(run_dir, "average_adapter"), "run_dir": run_dir, "members": members,
                "trained": results, "dev": None}

    average_dir = average_adapters(members, os.path.join(run_dir, "average_adapter"), log)
    dev = None
    member_scores = [_member_dev_f1(m) for m in members]
    if train_args.eval_f1_steps and dev_records and all(member_scores):
        dev = _score_average(model_args, prompt_args, train_args, average_dir, train_records, dev_records,
                             members, member_scores, log)
    world.wait_long("letting the other processes know the average is written")
    return {"adapter_dir": average_dir, "run_dir": run_dir, "members": members, "trained": results, "dev": dev}


def _score_average(model_args: ModelArgs, prompt_args: PromptArgs, train_args: TrainArgs, average_dir: str,
                   train_records: list[dict], dev_records: list[dict], members: list[str],
                   member_scores: list[dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    from .evaluation import dev_scalars
    from .inference import load_for_inference

    loaded = load_for_inference(model_args, prompt_args, average_dir)
    result = _dev_evaluator(loaded.tokenizer, loaded.template, train_records, dev_records, train_args)(loaded.model)
    del loaded
    _free_accelerator_memory()
    f1 = dev_scalars(result)["dev_f1"]
    mean = sum(s["dev_f1"] for s in member_scores) / len(member_scores)
    best = max(range(len(members)), key=lambda i: member_scores[i]["dev_f1"])
    record = {"members": [{"adapter": m, **s} for m, s in zip(members, member_scores)],
              "members_mean_dev_f1": mean, **result}
    with open(os.path.join(average_dir, "dev_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False, indent=2)
        f.write("\n")
    scores = ", ".join(f"{100 * s['dev_f1']:.2f}" for s in member_scores)
    log(f"average of {len(members)} seeds: dev F1 {100 * f1:.2f} on {result['records']} dev records; the members' "
        f"best there {scores} (mean {100 * mean:.2f}) -> {average_dir}")
    if f1 <= mean:
        log(f"note: the average is not above its members' mean dev F1; the best member, {members[best]}, may be the "
            "better adapter to use (the members' scores are each the best of their run's evaluations, so this "
            "comparison already favours them)")
    return record

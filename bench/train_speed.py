"""Training-step throughput of the seed's recipe and ours, on a Baichuan-7B-shaped 4-bit model.

    # on one GPU (about 4-6 minutes; the MSRA corpus and the Baichuan tokenizer.model must be at
    # ../shared/data/... or in .up/, see --msra and --tokenizer)
    python bench/train_speed.py --json $OUT/train_speed.json
    python bench/train_speed.py --recipes seed,ours-W_pack --steps 5      # a quicker subset
    # anywhere, in seconds: tiny model, generated corpus and tokenizer, no GPU needed
    python bench/train_speed.py --tiny
    # data-parallel scaling of the real training command on 1 and on 4 GPUs, DDP (torchrun) and
    # DeepSpeed ZeRO-2 (accelerate launch), with a one-process run over the same global batches
    python bench/train_speed.py --nproc 4 --model_dir model_hub/baichuan-7B --json $OUT/train_scaling.json
    python bench/train_speed.py --nproc 2 --tiny          # the same on the CPU (gloo): it runs, not a speed

The model has Baichuan-7B's shape (hidden 4096, 32 layers, fused W_pack, vocab 64,000) and random
weights: NF4 with double quantisation and bf16 compute, embeddings and head in bf16, exactly what
from_pretrained(quantization_config=NF4) would build, minus the 14 GB download. The samples are
real MSRA training records through the real Baichuan vocabulary, so token counts and padding are
those of a real run. Every recipe sees the same random subset of the training split.

Recipes (each: warm-up steps, then timed optimizer steps, AdamW and gradient clipping included):

    seed             the seed's recipe, GUIDE section 1: its template, every sample cut or padded to
                     192 tokens, no attention mask, batch 64, prepare_model_for_kbit_training (fp32
                     upcast + gradient checkpointing), LoRA r=8 on W_pack, HF loss on full logits
    ours-W_pack      the project's training step with the seed's LoRA targets: plan_speed defaults
                     (memory mode and token budget from free memory, Liger kernels if installed),
                     length-grouped token-budget micro-batches, no attention mask, bf16 autocast,
                     loss only at answer positions; one step = one micro-batch
    ours-all-linear  the same with the project's default LoRA targets (every block linear)
    lean-4096/8192   memory mode lean (activation checkpointing) with a 4096/8192-token budget
    offload-8192     memory mode offload (lean + checkpointed block inputs in pinned CPU memory)

After the timings, --check_steps N trains the same LoRA init on the same micro-batches twice, the
plain way (attention mask, no autocast, fp32 LoRA compute, HF loss on full logits, no fused
kernels) and the fast way (as ours-W_pack), and compares the first batch's LoRA gradients and the
losses after N steps: the fast path must compute the same training.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import fmt, gib, log  # noqa: E402

import torch  # noqa: E402

from cnqlora.batching import BatchStream  # noqa: E402
from cnqlora.data import IGNORE_INDEX, encode_sample  # noqa: E402
from cnqlora.models import LoraArgs, attach_lora, resolve_dtype  # noqa: E402
from cnqlora.speed import apply_fused_kernels, plan_speed, remove_fused_kernels, step_context  # noqa: E402
from cnqlora.training import collate, eval_plan, evaluate_loss, labelled_tokens, loss_sum  # noqa: E402

SEED_LEN = 192
SEED_BATCH = 64
LR = 3e-4
MAX_SEQ_LEN = 256
# Enough records for warm-up + timed steps at the largest micro-batches, and for the check's
# 20 steps plus its evaluation samples, without reaching a second epoch of the stream.
SUBSET = 4096
EVAL_SAMPLES = 256
# bf16 autocast vs fp32 LoRA compute differ at the 1e-3 level per step. A wrong fast path (a mask
# or label off by one, a broken fused kernel) trains something else: with random base weights the
# loss level hardly tells, but how far training moved it does, hence the second criterion.
CHECK_TOLERANCE = 0.01
CHECK_DROP_TOLERANCE = 0.1
# With random weights the most telling comparison is the gradient of one batch at the same
# weights: a label or mask mistake turns it elsewhere, bf16 rounding does not.
CHECK_GRAD_COSINE = 0.99


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str  # "seed" or "ours"
    targets: tuple[str, ...]
    memory_mode: str = "auto"
    max_tokens: int | None = None


RECIPES = {r.name: r for r in (
    Recipe("seed", "seed", ("W_pack",)),
    Recipe("ours-W_pack", "ours", ("W_pack",)),
    Recipe("ours-all-linear", "ours", ("all-linear",)),
    Recipe("lean-4096", "ours", ("all-linear",), "lean", 4096),
    Recipe("lean-8192", "ours", ("all-linear",), "lean", 8192),
    Recipe("offload-8192", "ours", ("all-linear",), "offload", 8192),
)}


@dataclass
class Context:
    args: argparse.Namespace
    device: str
    config: Any
    tokenizer: Any
    seed_samples: list[tuple[list[int], list[int], int]]
    samples: list[dict[str, list[int]]]
    compute_dtype: Any


# --------------------------------------------------------------------------- data


def seed_encode(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int], int]:
    """The seed's sample: (ids, labels) padded with EOS or cut to 192, and its real length."""
    prompt = tokenizer.encode(common.seed_prompt(record), add_special_tokens=False)
    target = tokenizer.encode(f"<s>{record['answer']}</s>", add_special_tokens=False)
    ids = (prompt + target)[:SEED_LEN]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:SEED_LEN]
    real = len(ids)
    pad = SEED_LEN - real
    return ids + [tokenizer.eos_token_id] * pad, labels + [IGNORE_INDEX] * pad, real


def prepare_data(args, tokenizer, corpus: str, train_sentences: int):
    train, _ = common.load_sentences(corpus, train_sentences)
    rng = random.Random(args.seed)
    chosen = rng.sample(range(len(train)), min(SUBSET, len(train)))
    records = common.to_records([train[i] for i in chosen])
    seed_samples = [seed_encode(tokenizer, r) for r in records]
    samples = []
    for record in records:
        encoded = encode_sample(tokenizer, "baichuan", record, MAX_SEQ_LEN)
        if encoded is not None:
            samples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    lengths = sorted(len(s["input_ids"]) for s in samples)
    real = [n for _, _, n in seed_samples]
    log(f"{len(records)} train records (random subset, seed {args.seed}); ours: mean {sum(lengths) / len(lengths):.1f} "
        f"tokens, max {lengths[-1]}; seed: mean {sum(real) / len(real):.1f} real of {SEED_LEN} "
        f"({100 * (1 - sum(real) / (SEED_LEN * len(real))):.0f}% padding), {sum(n == SEED_LEN for n in real)} cut")
    return seed_samples, samples


# --------------------------------------------------------------------------- timing


def timed_steps(step: Callable[[int], tuple[float, int, int]], warmup: int, steps: int, device: str,
                deadline: float) -> dict[str, Any]:
    """Run warm-up then timed steps; each step returns (loss, samples, real tokens).

    The warm-up also runs every micro-batch that will be timed, once, untimed: token-budget
    batches come in many shapes, and each new shape costs kernel selection and Triton
    compilation the first time. Measured on the H200 (bench/NOTES.md): with 3 plain warm-up
    steps, the first fast recipe of a process ran at 83 samples/s and the same recipe run second
    at 171.
    """
    for k in range(warmup + steps):
        step(k)
        if time.perf_counter() > deadline:
            return {"status": "out of time during warm-up", "steps": 0}
    common.sync(device)
    start = time.perf_counter()
    losses, samples, tokens = [], 0, 0
    status = "ok"
    for k in range(warmup, warmup + steps):
        loss, n, t = step(k)
        losses.append(loss)
        samples += n
        tokens += t
        if time.perf_counter() > deadline and k < warmup + steps - 1:
            status = f"partial: out of time after {len(losses)} of {steps} steps"
            break
    common.sync(device)
    seconds = time.perf_counter() - start
    return {"status": status, "steps": len(losses), "seconds": seconds, "samples": samples, "tokens": tokens,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "mean_loss": sum(losses) / len(losses), "losses": losses}


def build(ctx: Context) -> tuple[Any, float]:
    # Liger's RoPE, once patched in by an earlier recipe, would stay on for every later model.
    remove_fused_kernels()
    start = time.perf_counter()
    model = common.build_model(ctx.config, ctx.device, seed=ctx.args.seed, compute_dtype=ctx.compute_dtype)
    common.sync(ctx.device)
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the bf16 originals of the quantised weights
    seconds = time.perf_counter() - start
    log(f"built the random NF4 model in {seconds:.1f}s")
    return model, seconds


def optimizer_step(params, optimizer, loss) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


StepLoss = Callable[[int], tuple[Any, int, int]]


def run_recipe(ctx: Context, deadline: float, attach: Callable[[Any], tuple[Any, StepLoss, dict[str, Any]]],
               prepare: Callable[[Any], Any] = lambda model: model) -> dict[str, Any]:
    """Build, train with AdamW under timed_steps, and say where the memory went.

    `prepare(model)` runs before the weights are measured (the seed's fp32 upcast is weights);
    `attach(model)` adds LoRA and returns (model, loss of step k -> (loss, samples, real tokens),
    the recipe's fields of the result).
    """
    base_mem = common.allocated(ctx.device)
    model, build_s = build(ctx)
    common.reset_peak(ctx.device)
    model = prepare(model)
    after_weights = common.allocated(ctx.device)
    quantized, other = common.weight_bytes(model)
    model, loss_of, fields = attach(model)
    after_lora = common.allocated(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step(k: int) -> tuple[float, int, int]:
        loss, samples, tokens = loss_of(k)
        optimizer_step(params, optimizer, loss)
        return loss.item(), samples, tokens

    result = timed_steps(step, ctx.args.warmup, ctx.args.steps, ctx.device, deadline)
    result.update(build_s=build_s, **fields, trainable=sum(p.numel() for p in params))
    result["memory"] = memory_breakdown(ctx.device, base_mem, after_weights, after_lora, quantized, other)
    return result


def run_seed(ctx: Context, recipe: Recipe, deadline: float) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    def attach(model):
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=list(recipe.targets), bias="none",
                                                 task_type="CAUSAL_LM"))
        data = ctx.seed_samples

        def loss_of(k: int):
            rows = [data[(k * SEED_BATCH + i) % len(data)] for i in range(SEED_BATCH)]
            ids = torch.tensor([r[0] for r in rows], device=ctx.device)
            labels = torch.tensor([r[1] for r in rows], device=ctx.device)
            return model(input_ids=ids, labels=labels).loss, len(rows), sum(r[2] for r in rows)

        return model, loss_of, dict(targets="W_pack", memory_mode="fp32 upcast + grad ckpt", max_tokens=None,
                                    micro_batch=f"{SEED_BATCH} x {SEED_LEN}", fused_kernels="off", autocast="off")

    return run_recipe(ctx, deadline, attach, prepare=prepare_model_for_kbit_training)


def ours_plan(ctx: Context, model, memory_mode: str, max_tokens: int | None, fused: str):
    longest = max(len(s["input_ids"]) for s in ctx.samples)
    return plan_speed(memory_mode, max_tokens, fused, model.config, ctx.device, ctx.compute_dtype, longest)


def run_ours(ctx: Context, recipe: Recipe, deadline: float, fused: str = "auto") -> dict[str, Any]:
    def attach(model):
        plan = ours_plan(ctx, model, recipe.memory_mode, recipe.max_tokens, fused)
        model, targets = attach_lora(model, LoraArgs(lora_r=8, lora_alpha=16, lora_dropout=0.05,
                                                     lora_target=list(recipe.targets)),
                                     gradient_checkpointing=plan.memory_mode in ("lean", "offload"))
        if plan.fused_kernels == "liger":
            apply_fused_kernels(model)
        log(f"{recipe.name}: {plan.describe()}; LoRA on {','.join(targets)}")
        samples = ctx.samples
        stream = BatchStream([len(s["input_ids"]) for s in samples], ctx.args.seed, batch_size=SEED_BATCH,
                             max_tokens=plan.max_tokens)
        pad_id = ctx.tokenizer.pad_token_id
        model.train()

        def loss_of(k: int):
            indices = stream.batch(k)
            batch = collate([samples[i] for i in indices], pad_id)
            n_labelled = labelled_tokens(batch)
            batch = {name: t.to(ctx.device) for name, t in batch.items()}
            with step_context(plan, ctx.device):
                loss = loss_sum(model, batch) / max(1, n_labelled)
            return loss, len(indices), sum(len(samples[i]["input_ids"]) for i in indices)

        return model, loss_of, dict(
            targets=",".join(targets), memory_mode=plan.memory_mode, max_tokens=plan.max_tokens,
            micro_batch=f"<= {plan.max_tokens} tokens" if plan.max_tokens else f"{SEED_BATCH} samples",
            fused_kernels=plan.fused_kernels, autocast=str(plan.autocast_dtype).replace("torch.", ""),
            plan=plan.describe())

    return run_recipe(ctx, deadline, attach)


def memory_breakdown(device: str, base: int | None, after_weights: int | None, after_lora: int | None,
                     quantized: int, other: int) -> dict[str, Any]:
    """Where the peak goes: weights, LoRA, optimizer states (measured at rest), activations and the rest."""
    out: dict[str, Any] = {"weights_4bit_gib": gib(quantized), "weights_other_gib": gib(other)}
    if not device.startswith("cuda"):
        return out
    rest = common.allocated(device)  # after the last step: weights + LoRA + Adam states, gradients freed
    top = common.peak(device)
    out.update(weights_gib=gib(after_weights - base), lora_gib=gib(after_lora - after_weights),
               optimizer_gib=gib(rest - after_lora), activations_and_other_gib=gib(top - rest),
               peak_gib=gib(top))
    return out


# --------------------------------------------------------------------------- the check


def run_check(ctx: Context, steps: int, lr: float, max_tokens: int, deadline: float,
              fused: str = "auto") -> dict[str, Any]:
    """Plain vs fast training from one LoRA init on the same micro-batches; the losses must agree.

    LoRA dropout is off here so the two runs differ only in how they compute, not in dropout masks.
    The token budget is smaller than training's: the plain path keeps full fp32 logits and fp32
    LoRA activations, and the comparison needs no large batches.
    """
    model, _ = build(ctx)
    longest = max(len(s["input_ids"]) for s in ctx.samples)
    plan = ours_plan(ctx, model, "auto", max(longest, max_tokens) if ctx.device != "cpu" else None, fused)
    model, _ = attach_lora(model, LoraArgs(lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target=["W_pack"]),
                           gradient_checkpointing=plan.memory_mode in ("lean", "offload"))
    model.train()
    with torch.no_grad():
        # A non-zero B (peft starts it at 0) puts the adapter into the forward pass from the first
        # step, so its compute path is compared too and both LoRA matrices get gradients.
        generator = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in params]
    samples = ctx.samples
    stream = BatchStream([len(s["input_ids"]) for s in samples], ctx.args.seed + 1, batch_size=SEED_BATCH,
                         max_tokens=plan.max_tokens)
    micro = [stream.batch(k) for k in range(steps)]
    used = {i for batch in micro for i in batch}
    wanted = EVAL_SAMPLES // (4 if ctx.args.tiny else 1)
    held_out = [i for i in range(len(samples)) if i not in used][:wanted]
    if len(held_out) < wanted // 4:
        held_out = list(range(min(wanted, len(samples))))  # small corpora: score training samples instead
    eval_batches = [[held_out[j] for j in b] for b in
                    eval_plan([len(samples[i]["input_ids"]) for i in held_out], SEED_BATCH, plan.max_tokens)]
    pad_id = ctx.tokenizer.pad_token_id

    def batch_of(indices):
        return {k: v.to(ctx.device) for k, v in collate([samples[i] for i in indices], pad_id).items()}

    def evaluate() -> float:
        # One evaluator for both runs: plain computation, fp32 LoRA, attention mask.
        return evaluate_loss(model, samples, eval_batches, pad_id, ctx.device, attention_mask=True)

    def plain_step(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def fast_step(batch):
        with step_context(plan, ctx.device):
            return loss_sum(model, batch) / max(1, labelled_tokens(batch))

    def reset() -> None:
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)

    def gradient(compute) -> torch.Tensor:
        """The LoRA gradient of the first micro-batch at the initial weights."""
        reset()
        compute(batch_of(micro[0])).backward()
        flat = torch.cat([p.grad.detach().float().flatten() for p in params])
        model.zero_grad(set_to_none=True)
        return flat

    def train(compute) -> list[float]:
        reset()
        optimizer = torch.optim.AdamW(params, lr=lr)
        losses = []
        for indices in micro:
            loss = compute(batch_of(indices))
            optimizer_step(params, optimizer, loss)
            losses.append(loss.item())
            if time.perf_counter() > deadline:
                raise TimeoutError(f"out of time after {len(losses)} of {steps} check steps")
        return losses

    before = evaluate()
    grad_plain = gradient(plain_step)
    plain = train(plain_step)
    after_plain = evaluate()
    if plan.fused_kernels == "liger":
        apply_fused_kernels(model)
    grad_fast = gradient(fast_step)
    fast = train(fast_step)
    remove_fused_kernels(model)
    after_fast = evaluate()
    cosine = float(torch.nn.functional.cosine_similarity(grad_fast, grad_plain, dim=0))
    norm_ratio = float(grad_fast.norm() / grad_plain.norm().clamp_min(1e-30))

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    drop_plain, drop_fast = before - after_plain, before - after_fast
    level_ok = rel(after_fast, after_plain) <= CHECK_TOLERANCE
    # A drop this small is rounding, not training; its relative difference means nothing.
    drop_ok = drop_plain < 0.05 or rel(drop_fast, drop_plain) <= CHECK_DROP_TOLERANCE
    grad_ok = cosine >= CHECK_GRAD_COSINE and abs(norm_ratio - 1) <= CHECK_TOLERANCE * 5
    verdict = (("MATCH" if level_ok and drop_ok and grad_ok else "MISMATCH")
               + f" (first gradient cosine >= {CHECK_GRAD_COSINE} and norm within {5 * CHECK_TOLERANCE:.0%}, "
               f"held-out loss within {CHECK_TOLERANCE:.0%}, its drop within {CHECK_DROP_TOLERANCE:.0%})")
    return {"status": "ok", "verdict": verdict, "steps": steps, "lr": lr, "plan": plan.describe(),
            "samples": sum(len(b) for b in micro), "grad_cosine": cosine, "grad_norm_ratio": norm_ratio,
            "eval_samples": len(held_out), "eval_loss_before": before,
            "eval_loss_plain": after_plain, "eval_loss_fast": after_fast,
            "eval_rel_diff": rel(after_fast, after_plain),
            "drop_plain": drop_plain, "drop_fast": drop_fast,
            "drop_rel_diff": rel(drop_fast, drop_plain) if abs(drop_plain) > 1e-9 else None,
            "first_step_loss_plain": plain[0], "first_step_loss_fast": fast[0],
            "first_step_rel_diff": rel(fast[0], plain[0]),
            "last_step_loss_plain": plain[-1], "last_step_loss_fast": fast[-1],
            "last_step_rel_diff": rel(fast[-1], plain[-1]),
            "train_losses_plain": plain, "train_losses_fast": fast}


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated, in order (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    parser.add_argument("--check_steps", type=int, default=None,
                        help="steps of the plain-vs-fast loss check, 0 to skip (default 20; --tiny 3)")
    parser.add_argument("--check_max_tokens", type=int, default=4096,
                        help="token budget of the check's micro-batches on the GPU")
    parser.add_argument("--check_lr", type=float, default=1e-3,
                        help="learning rate of the check (larger than training's so the loss visibly moves)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="instead of the recipes: data-parallel scaling of the real training command "
                             "(baichuan_qlora.py under torchrun) on 1 and on N processes, one per GPU")
    parser.add_argument("--model_dir", default="model_hub/baichuan-7B",
                        help="--nproc: the base model folder (--tiny: a tiny one is built)")
    parser.add_argument("--train_file", default="data/msra/train.txt",
                        help="--nproc: training data (--tiny: a synthetic NER corpus is built)")
    parser.add_argument("--train_args", default="--config configs/msra_baichuan7b.yaml",
                        help="--nproc: further options of baichuan_qlora.py, the same for every process count")
    parser.add_argument("--launchers", default="ddp,deepspeed",
                        help="--nproc: comma-separated, how the N processes are started: ddp (torchrun), deepspeed "
                             "(accelerate launch, configs/accelerate/deepspeed_zero2.yaml; needs deepspeed>=0.19.1)")
    parser.add_argument("--accum", type=int, default=1,
                        help="--nproc: gradient_accumulation_steps of every process")
    parser.add_argument("--check_losses", type=int, default=1,
                        help="--nproc: 1 = also train one process with N times the accumulation (the N-process runs' "
                             "global batches) and compare the per-step losses, every run without LoRA dropout "
                             "(masks differ between ranks); 0 = skip")
    common.add_common_args(parser, time_budget=500.0)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.check_steps = args.check_steps if args.check_steps is not None else (3 if args.tiny else 20)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    args.recipe_list = [RECIPES[n] for n in names]
    args.launcher_list = [n.strip() for n in args.launchers.split(",") if n.strip()]
    bad = [n for n in args.launcher_list if n not in ("ddp", "deepspeed")]
    if bad:
        parser.error(f"unknown launcher(s) {', '.join(bad)}; choose from ddp, deepspeed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.nproc:
        return run_scaling(args)
    phases, budget, device, report = common.begin(args)

    with phases("data"):
        corpus, tokenizer_path, train_sentences = common.resolve_inputs(args)
        tokenizer = common.load_tokenizer(tokenizer_path)
        seed_samples, samples = prepare_data(args, tokenizer, corpus, train_sentences)
    peak_tflops = None
    if device == "cuda":
        with phases("bf16 matmul peak"):
            peak_tflops = common.matmul_peak_tflops()
            log(f"bf16 matmul peak (8192^3, median of 10): {peak_tflops:.0f} TFLOP/s")
    report["matmul_peak_tflops"] = peak_tflops
    config = common.model_config(args.tiny, vocab_size=len(tokenizer))
    ctx = Context(args, device, config, tokenizer, seed_samples, samples, resolve_dtype("auto", device))

    results: dict[str, dict[str, Any]] = {}
    report["recipes"] = results
    # The check runs last but is what says the fast path is right: keep time for it.
    check_estimate = (90.0 if device == "cuda" else 10.0) if args.check_steps else 0.0
    durations: list[float] = []
    for recipe in args.recipe_list:
        estimate = 1.2 * max(durations) if durations else (60.0 if device == "cuda" else 5.0)
        if not budget.allows(estimate + check_estimate, f"recipe {recipe.name}"):
            results[recipe.name] = {"status": "skipped (time budget)"}
            continue
        deadline = common.STARTED + args.time_budget - check_estimate
        start = time.perf_counter()
        with phases(f"recipe {recipe.name}"):
            if recipe.path == "seed":
                result = common.guarded(lambda fused: run_seed(ctx, recipe, deadline), device,
                                        retry_without_liger=False)
            else:
                result = common.guarded(lambda fused: run_ours(ctx, recipe, deadline, fused), device)
            results[recipe.name] = result
            report_recipe(recipe.name, result, peak_tflops)
        durations.append(time.perf_counter() - start)
        if recipe.name == "ours-W_pack" and "seconds" in results[recipe.name]:
            r = results[recipe.name]
            per_step = r["seconds"] / r["steps"]
            check_estimate = r["build_s"] + 2.5 * args.check_steps * per_step + 20
        common.write_json(args.json, report)

    if args.check_steps:
        if budget.allows(check_estimate, "the plain-vs-fast check"):
            with phases("check plain vs fast"):
                report["check"] = common.guarded(lambda fused: run_check(ctx, args.check_steps, args.check_lr,
                                                                         args.check_max_tokens,
                                                                         common.STARTED + args.time_budget, fused),
                                                 device)
                report_check(report["check"])
        else:
            report["check"] = {"status": "skipped (time budget)"}

    common.add_ratio_to_seed(results, "seed", "samples_per_s")
    report["elapsed_s"] = common.elapsed()
    common.write_json(args.json, report)
    print_tables(results, report.get("check"), peak_tflops)
    failed = [n for n, r in results.items() if str(r.get("status", "")).startswith("error")]
    if str(report.get("check", {}).get("status", "")).startswith("error"):
        failed.append("check")
    return 1 if failed else 0


def mfu(tokens_per_s: float | None, peak_tflops: float | None) -> float | None:
    if tokens_per_s is None or not peak_tflops:
        return None
    return common.FLOPS_PER_TOKEN * tokens_per_s / (peak_tflops * 1e12)


def report_recipe(name: str, r: dict[str, Any], peak_tflops: float | None) -> None:
    if "samples_per_s" not in r:
        log(f"{name}: {r['status']}")
        return
    r["mfu"] = mfu(r["tokens_per_s"], peak_tflops)
    m = r["memory"]
    log(f"{name}: {r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:,.0f} real tokens/s, "
        f"MFU {fmt(None if r['mfu'] is None else 100 * r['mfu'])}%, peak {fmt(m.get('peak_gib'), 2)} GiB, "
        f"mean loss {r['mean_loss']:.4f} over {r['steps']} timed steps ({r['samples']} samples, {r['tokens']} real "
        f"tokens, {r['seconds']:.1f}s; build {r['build_s']:.1f}s; {r['trainable']:,} trainable) [{r['status']}]")
    log(f"{name}: memory: weights {fmt(m.get('weights_gib'), 2)} GiB (4-bit {fmt(m['weights_4bit_gib'], 2)}, "
        f"other {fmt(m['weights_other_gib'], 2)}), LoRA {fmt(m.get('lora_gib'), 3)}, Adam states "
        f"{fmt(m.get('optimizer_gib'), 3)}, activations/other {fmt(m.get('activations_and_other_gib'), 2)} GiB")


def report_check(c: dict[str, Any]) -> None:
    if "eval_rel_diff" not in c:
        log(f"check: {c.get('status')}")
        return
    log(f"check: {c['verdict']}")
    log(f"  first-batch LoRA gradient: cosine(fast, plain) {c['grad_cosine']:.6f}, norm ratio {c['grad_norm_ratio']:.5f}")
    log(f"check ({c['steps']} steps, lr {c['lr']}, same LoRA init and micro-batches; fast = {c['plan']}):")
    log(f"  first-step loss: plain {c['first_step_loss_plain']:.5f}, fast {c['first_step_loss_fast']:.5f} "
        f"(rel diff {c['first_step_rel_diff']:.2e})")
    log(f"  last-step loss:  plain {c['last_step_loss_plain']:.5f}, fast {c['last_step_loss_fast']:.5f} "
        f"(rel diff {c['last_step_rel_diff']:.2e})")
    log(f"  held-out loss ({c['eval_samples']} samples): before {c['eval_loss_before']:.5f}, after plain "
        f"{c['eval_loss_plain']:.5f}, after fast {c['eval_loss_fast']:.5f} (rel diff {c['eval_rel_diff']:.2e}); "
        f"drop plain {c['drop_plain']:.5f}, fast {c['drop_fast']:.5f}"
        + (f" (rel diff {c['drop_rel_diff']:.2e})" if c["drop_rel_diff"] is not None else ""))


def print_tables(results: dict[str, dict[str, Any]], check: dict[str, Any] | None, peak_tflops: float | None) -> None:
    print()
    if check and "eval_rel_diff" in check:
        print(f"Check after {check['steps']} steps: {check['verdict']}: "
              f"first-batch gradient cosine {check['grad_cosine']:.5f}, norm ratio {check['grad_norm_ratio']:.4f}; "
              f"held-out loss plain {check['eval_loss_plain']:.4f} vs fast "
              f"{check['eval_loss_fast']:.4f} (rel diff {check['eval_rel_diff']:.2e}); last-step loss plain "
              f"{check['last_step_loss_plain']:.4f} vs fast {check['last_step_loss_fast']:.4f} "
              f"(rel diff {check['last_step_rel_diff']:.2e})")
    elif check:
        print(f"Check: {check.get('status')}")
    print(f"\nbf16 matmul peak: {fmt(peak_tflops, 0)} TFLOP/s\n")
    headers = ["recipe", "LoRA targets", "memory mode", "micro-batch", "samples/s", "real tokens/s", "MFU %",
               "peak GiB", "vs seed", "mean loss", "status"]
    rows = []
    for name, r in results.items():
        if "samples_per_s" not in r:
            rows.append([name] + ["n/a"] * 9 + [r.get("status", "")])
            continue
        rows.append([name, r["targets"], r["memory_mode"], r["micro_batch"], fmt(r["samples_per_s"], 2),
                     fmt(r["tokens_per_s"], 0), fmt(None if r.get("mfu") is None else 100 * r["mfu"]),
                     fmt(r["memory"].get("peak_gib"), 2), fmt(r.get("ratio_to_seed"), 2) + ("x" if r.get("ratio_to_seed") else ""),
                     fmt(r["mean_loss"], 4), r["status"]])
    memory_rows = [] if peak_tflops is None else [[name, fmt(r["memory"].get("weights_gib"), 2), fmt(r["memory"]["weights_4bit_gib"], 2),
                    fmt(r["memory"]["weights_other_gib"], 2), fmt(r["memory"].get("lora_gib"), 3),
                    fmt(r["memory"].get("optimizer_gib"), 3), fmt(r["memory"].get("activations_and_other_gib"), 2),
                    fmt(r["memory"].get("peak_gib"), 2)]
                   for name, r in results.items() if "memory" in r]
    if memory_rows:
        print("Memory (GiB; weights measured with memory_allocated, 4-bit/other from the tensors):\n")
        print(common.markdown_table(["recipe", "weights", "4-bit part", "bf16/fp32 part", "LoRA", "Adam states",
                                     "activations/other", "peak"], memory_rows))
        print()
    lean = [f"{name} {r['memory']['peak_gib']:.1f} GiB" for name, r in results.items()
             if name.startswith(("lean", "offload")) and r.get("memory", {}).get("peak_gib") is not None]
    if lean:
        print(f"Peak memory of the lean presets (goal: at most 12 GiB): {', '.join(lean)}\n")
    print(common.markdown_table(headers, rows))



# --------------------------------------------------------------------------- data-parallel scaling


def scaling_inputs(args) -> tuple[str, str]:
    """(model folder, training file): the given ones, or with --tiny a tiny model and NER corpus."""
    if not args.tiny:
        return args.model_dir, args.train_file
    import json
    import tempfile

    from cnqlora.msra import prepare_msra
    from cnqlora.tiny import synthetic_ner_sentences, write_bio, write_tiny_baichuan

    work = args.workdir or tempfile.mkdtemp(prefix="train-scaling-")
    os.makedirs(work, exist_ok=True)
    bio = write_bio(os.path.join(work, "corpus.txt"), synthetic_ner_sentences(300))
    prepare_msra(out_dir=os.path.join(work, "data"), source=bio, train_sentences=280, dev_size=10)
    train_file = os.path.join(work, "data", "train.txt")
    with open(train_file, encoding="utf-8") as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    return write_tiny_baichuan(os.path.join(work, "model"), texts, vocab_size=1200), train_file


def timed_window(metrics_file: str, warmup: int) -> dict[str, float]:
    """Samples per second over the steps after the warm-up, from the run's per-step log."""
    import json

    with open(metrics_file, encoding="utf-8") as f:
        logged = [h for h in map(json.loads, f) if "train_steps_per_s" in h]
    steps = [h for h in logged if h["step"] > warmup]
    seconds = sum(1 / h["train_steps_per_s"] for h in steps)
    samples = sum(h["train_samples_per_s"] / h["train_steps_per_s"] for h in steps)
    peaks = [h["train_peak_gib"] for h in logged if "train_peak_gib" in h]
    return {"steps": len(steps), "seconds": seconds, "samples": samples, "samples_per_s": samples / seconds,
            "peak_gib": max(peaks) if peaks else None, "losses": [h["train_loss"] for h in logged]}


def run_scaling(args) -> int:
    """Train the same recipe on 1 and on --nproc processes and report the data-parallel speed-up.

    Weak scaling, as multi-GPU training is used: each process keeps its micro-batches and
    gradient accumulation, so N processes take N times the samples per optimizer step. The
    timing is the training loop's own per-step log (metrics.jsonl), warm-up steps left out; so
    is the peak GPU memory (the fullest rank's). Each launcher in --launchers runs the N-process
    training (ddp: torchrun; deepspeed: accelerate launch with configs/accelerate/
    deepspeed_zero2.yaml). With --check_losses a one-process run with N times the accumulation
    takes the same global batches as the N-process runs, and their per-step losses are compared.
    """
    import shlex
    import subprocess
    import tempfile

    model_dir, train_file = scaling_inputs(args)
    extra = shlex.split(args.train_args) if not args.tiny else [
        "--device", "cpu", "--batch_size", "4", "--max_seq_len", "96", "--memory_mode", "fast"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="train-scaling-runs-")
    if args.check_losses:
        # Dropout masks differ between ranks (each its own seed), so only without dropout can the
        # N-process losses equal the one-process ones.
        extra += ["--lora_dropout", "0"]
    runs = [("1", "ddp", 1, args.accum)]
    runs += [(f"{launcher}-{args.nproc}", launcher, args.nproc, args.accum) for launcher in args.launcher_list]
    if args.check_losses:
        runs.append((f"1-same-batches-as-{args.nproc}", "ddp", 1, args.accum * args.nproc))
    results: dict[str, Any] = {}
    for name, launcher, nproc, accum in runs:
        command = [*launch_command(launcher, nproc, repo), os.path.join(repo, "baichuan_qlora.py"), *extra,
                   "--model_name_or_path", model_dir, "--train_file", train_file, "--dev_file", "none",
                   "--output_dir", out, "--run_name", name, "--gradient_accumulation_steps", str(accum),
                   "--max_steps", str(args.warmup + args.steps), "--logging_steps", "1", "--eval_steps", "0",
                   "--save_steps", "0", "--tensorboard", "false"]
        log(f"{name}: {shlex.join(command)}")
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"status": f"error: exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
            log(results[name]["status"])
            continue
        results[name] = {"launcher": launcher, "processes": nproc, "accumulation": accum,
                         **timed_window(os.path.join(out, name, "metrics.jsonl"), args.warmup)}
    base = results.get("1", {}).get("samples_per_s")
    reference = results.get(f"1-same-batches-as-{args.nproc}", {}).get("losses")
    print("\n| run | processes | samples/s | speed-up | efficiency | peak GiB per GPU | per-step loss vs one process, "
          "same batches |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "samples_per_s" not in r:
            print(f"| {name} | | {r.get('status', '-')} | | | | |")
            continue
        check = ""
        if reference and r["processes"] > 1:
            r["max_loss_rel_diff"] = max_rel_diff(r["losses"], reference)
            check = f"max rel. diff {r['max_loss_rel_diff']:.1e}"
        if base and r["accumulation"] == args.accum:
            r["speedup"] = r["samples_per_s"] / base
            r["efficiency"] = r["speedup"] / r["processes"]
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        efficiency = f"{100 * r['efficiency']:.0f}%" if "efficiency" in r else "-"
        print(f"| {name} | {r['processes']} | {r['samples_per_s']:.2f} | {speedup} | {efficiency} | {peak} | {check} |")
    common.write_json(args.json, {"nproc": args.nproc, "scaling": results})
    return 0 if all("samples_per_s" in r for r in results.values()) else 1


def launch_command(launcher: str, nproc: int, repo: str) -> list[str]:
    """The command line that starts `nproc` training processes with `launcher`."""
    import socket

    if launcher == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(repo, "configs", "accelerate", "deepspeed_zero2.yaml"), "--num_processes", str(nproc),
            "--main_process_port", str(port)]


def max_rel_diff(losses: list[float], reference: list[float]) -> float:
    """The largest relative difference of two per-step loss curves (inf when their steps differ)."""
    if len(losses) != len(reference):
        return float("inf")
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference))


if __name__ == "__main__":
    sys.exit(main())

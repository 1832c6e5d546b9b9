"""Prediction throughput: the seed's loop, batched generate (the old path) and the engine.

    # the engine suite, on one GPU (needs the MSRA corpus and Baichuan's tokenizer.model, see --help)
    python bench/predict_speed.py --suite engine --shape baichuan7b --json $OUT/engine_7b.json
    python bench/predict_speed.py --suite engine --shape qwen0.5b --json $OUT/engine_05b.json
    python bench/predict_speed.py --suite engine --tiny          # anywhere, in seconds
    # the earlier suite (seed loop, batched NF4, batched merged), on one GPU (about 2-3 minutes)
    python bench/predict_speed.py --json $OUT/predict_speed.json
    python bench/predict_speed.py --records 1024       # the batched paths on fewer test sentences
    # anywhere, in seconds (tiny model, generated corpus and tokenizer)
    python bench/predict_speed.py --tiny

The model is Baichuan-7B-shaped with random weights, NF4 + double quantisation, bf16 compute (see
bench/common.py); the inputs are the official MSRA test sentences (the 4,631 after the first
50,658). Random weights would stop at a random point, or never, so every path produces exactly
--new_tokens tokens per sentence (EOS is suppressed), and the rates compare equal work.

    seed-loop       the seed's predict.py: one sentence at a time, prompt tokenized with special
                    tokens, sampling (temperature 0.2, top_k 40, top_p 0.9, repetition_penalty 1.3)
    batched-nf4     our predict.py's file path: encode_prompt, prompts sorted by length within
                    windows of 8 batches, left-padded batches of --batch_size, greedy, KV cache
    batched-merged  the same on the merged 16-bit model: every NF4 weight dequantised into a plain
                    bf16 Linear (what `predict.py --merge_to` produces), same sentences and batches

The engine suite (`--suite engine`) times two workloads: `fixed`, exactly --new_tokens tokens per
sentence, and `reference`, each sentence generating its reference answer's token count plus EOS
(forced, since the weights are random), where a batch of generate() waits for its longest answer
and the engine refills a finished row's slot. Each path prints sentences/s, new tokens/s, peak GiB
and its share of a hardware limit: prefill FLOPs at the measured bf16 matmul peak plus, per decode
step of `batch` rows, one read of the weights at the measured copy bandwidth (KV reads ignored, so
the limit is generous).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace as dataclass_replace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import fmt, gib, log  # noqa: E402

import torch  # noqa: E402

from cnqlora.data import encode_prompt  # noqa: E402
from cnqlora.generation import GenerationArgs, generate_ids, length_sorted_batches, stop_token_ids  # noqa: E402
from cnqlora.models import resolve_dtype  # noqa: E402
from cnqlora.speed import apply_fused_kernels, liger_available, remove_fused_kernels  # noqa: E402


def no_stop_factory(stop_ids: list[int]):
    """A logits_processor_factory for generate_ids that makes every row run to max_new_tokens."""
    from transformers import LogitsProcessor

    class SuppressStops(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor(stop_ids, device=scores.device), float("-inf"))

    return lambda ids, max_new_tokens: SuppressStops()


def seed_loop(model, tokenizer, records, new_tokens: int, device: str, deadline: float) -> dict[str, Any]:
    """The seed's predict.py, per sentence: tokenize with special tokens, sample, decode."""
    stops = stop_token_ids(tokenizer, model)
    kwargs = dict(do_sample=True, temperature=0.2, top_k=40, top_p=0.9, repetition_penalty=1.3,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=stops,
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    produced = []

    def one(record) -> None:
        ids = tokenizer(common.seed_prompt(record), return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, **kwargs)
        new = out[0, ids.shape[1]:]
        tokenizer.decode(new, skip_special_tokens=True)
        produced.append(int(new.shape[0]))

    warmup, timed = records[:2], records[2:]
    for record in warmup:
        one(record)
    produced.clear()
    return timed_units(timed, one, produced, len(timed), deadline, device)


def timed_units(units, run, produced: list[int], total: int, deadline: float, device: str) -> dict[str, Any]:
    """Time run(unit) over the units until done or past the deadline; `run` appends each
    sentence's new-token count to `produced`, of `total` sentences in all."""
    common.sync(device)
    common.reset_peak(device)
    start = time.perf_counter()
    status = "ok"
    for i, unit in enumerate(units):
        run(unit)
        if time.perf_counter() > deadline and i < len(units) - 1:
            status = f"partial: out of time after {len(produced)} of {total} sentences"
            break
    common.sync(device)
    result = summary(time.perf_counter() - start, produced, status)
    result["peak_gib"] = gib(common.peak(device))
    return result


def batched(model, tokenizer, prompts: list[list[int]], batches: list[list[list[int]]], args: argparse.Namespace,
            device: str, deadline: float) -> dict[str, Any]:
    """predict.py's file path over the given windows of batches; stops at a window boundary when out of time."""
    gen = GenerationArgs(max_new_tokens=args.new_tokens, batch_size=args.batch_size, do_sample=False)
    factory = no_stop_factory(stop_token_ids(tokenizer, model))

    def run(batch: list[int]) -> list[int]:
        rows = generate_ids(model, tokenizer, [prompts[i] for i in batch], gen, factory)
        tokenizer.batch_decode(rows, skip_special_tokens=True)
        return rows

    run(batches[0][0])  # warm-up: kernels, cuBLAS handles, allocator
    common.sync(device)
    common.reset_peak(device)
    produced: list[int] = []
    outputs: dict[int, list[int]] = {}
    done_windows = 0
    status = "ok"
    start = time.perf_counter()
    for window in batches:
        for batch in window:
            for i, row in zip(batch, run(batch)):
                outputs[i] = row
                produced.append(len(row))
        done_windows += 1
        if time.perf_counter() > deadline and done_windows < len(batches):
            status = f"partial: out of time after {len(produced)} of {len(prompts)} sentences"
            break
    common.sync(device)
    result = summary(time.perf_counter() - start, produced, status)
    result.update(windows=done_windows, peak_gib=gib(common.peak(device)), outputs=outputs)
    return result


# --------------------------------------------------------------------------- the engine suite


def force_lengths_factory(targets: list[int], stop_ids: list[int]):
    """A logits_processor_factory for generate_ids: row r emits no stop token before targets[r] - 1
    new tokens, then a stop token (targets count the EOS)."""
    from transformers import LogitsProcessor

    class ForceLengths(LogitsProcessor):
        def __init__(self, width: int, rows: list[int]) -> None:
            self.width, self.rows = width, rows

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - self.width
            stops = torch.tensor(stop_ids, device=scores.device)
            wanted = torch.tensor([targets[i] for i in self.rows], device=scores.device)
            early = (step < wanted - 1)[:, None]
            scores = scores.masked_fill(early & torch.isin(torch.arange(scores.shape[1], device=scores.device),
                                                           stops)[None, :], float("-inf"))
            now = (step >= wanted - 1)[:, None]
            forced = torch.full_like(scores, float("-inf"))
            forced[:, stop_ids[0]] = 0.0
            return torch.where(now, forced, scores)

    return ForceLengths


def forced_batched(model, tokenizer, prompts, targets, batch_size: int, deadline: float, device: str):
    """generate() in length-sorted batches of batch_size, each row running to its target length."""
    stops = stop_token_ids(tokenizer, model)
    gen = GenerationArgs(max_new_tokens=max(targets), batch_size=batch_size, engine="hf")
    processor = force_lengths_factory(targets, stops)
    batches = [b for w in length_sorted_batches([len(p) for p in prompts], batch_size, window=batch_size * 8)
               for b in w]
    generate_ids(model, tokenizer, [prompts[i] for i in batches[0]], dataclass_replace(gen, max_new_tokens=2),
                 lambda ids, n: processor(ids.shape[1], batches[0]))  # warm-up
    produced: list[int] = []

    def run(batch: list[int]) -> None:
        batch_gen = dataclass_replace(gen, max_new_tokens=max(targets[i] for i in batch))
        rows = generate_ids(model, tokenizer, [prompts[i] for i in batch], batch_gen,
                            lambda ids, n: processor(ids.shape[1], batch))
        produced.extend(len(r) + 1 for r in rows)  # + the EOS the row ended on

    return timed_units(batches, run, produced, len(prompts), deadline, device)


def engine_run(model, tokenizer, prompts, targets, batch_size: int, device: str) -> dict[str, Any]:
    """The engine with no stop token: each request makes exactly its target tokens."""
    from cnqlora.engine import Engine, Request

    engine = Engine(model, [], tokenizer.pad_token_id, max_batch=batch_size, kv_memory_fraction=0.8)
    engine.generate([Request(prompts[0], 2)])  # warm-up
    check = None
    if engine.cuda_graphs:
        # CUDA graphs replay the eager kernels: the answers must not change with them
        few = [Request(p, t) for p, t in zip(prompts[:64], targets[:64])]
        replayed = engine.generate(few)
        engine.cuda_graphs = False
        eager = engine.generate(few)
        engine.cuda_graphs = True
        check = sum(a == b for a, b in zip(replayed, eager)) / len(few)
    common.sync(device)
    common.reset_peak(device)
    start = time.perf_counter()
    out = engine.generate([Request(p, t) for p, t in zip(prompts, targets)])
    common.sync(device)
    result = summary(time.perf_counter() - start, [len(o) for o in out], "ok")
    result.update(peak_gib=gib(common.peak(device)), engine=dict(engine.last_stats), graphs_equal_eager=check)
    assert [len(o) for o in out] == list(targets), "the engine did not make the forced lengths"
    return result


def hardware_limit(prompts, targets, batch: int, weight_bytes: float, params: float, peak_tflops: float,
                   bandwidth: float) -> float:
    """Sentences/s if prefill ran at the matmul peak and each decode step of `batch` rows read the
    weights once at full bandwidth (KV reads and attention FLOPs not counted)."""
    prefill = sum(map(len, prompts)) * 2 * params / (peak_tflops * 1e12)
    steps = sum(t - 1 for t in targets) / batch  # the first token of each comes with its prefill
    return len(prompts) / (prefill + steps * weight_bytes / bandwidth)


def copy_bandwidth(n_bytes: int = 4 * 2**30) -> float:
    """Bytes/s read + written by a device-to-device copy (median of 10)."""
    a = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    rates = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        rates.append(2 * a.nbytes / (start.elapsed_time(end) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return sorted(rates)[len(rates) // 2]


QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=True)
TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def build_qwen(tiny: bool, vocab_size: int, device: str, dtype, seed: int):
    """A Qwen2.5-0.5B-shaped model (random weights, std 0.02) in 16-bit."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(TINY_QWEN, vocab_size=vocab_size) if tiny else dict(QWEN_05B)
    generator = torch.Generator(device=device).manual_seed(seed)
    with common.default_dtype(dtype), torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def test_prompts(args):
    """(tokenizer, the official test records, the --records of them timed, their prompt ids)."""
    corpus, tokenizer_path, train_sentences = common.resolve_inputs(args)
    tokenizer = common.load_tokenizer(tokenizer_path)
    _, test = common.load_sentences(corpus, train_sentences)
    records = common.to_records(test)
    chosen = records[:args.records] if args.records else records
    prompts = [encode_prompt(tokenizer, "baichuan", r["instruct"], r["query"]).ids for r in chosen]
    return tokenizer, records, chosen, prompts


def engine_suite(args) -> int:
    """Seed loop, batched generate b64 (today's path before the engine) and the engine, per model form."""
    phases, budget, device, report = common.begin(args)
    results: dict[str, dict[str, Any]] = {}
    report["paths"] = results
    with phases("data"):
        tokenizer, records, chosen, prompts = test_prompts(args)
        reference = [len(tokenizer.encode(r["answer"], add_special_tokens=False)) + 1 for r in chosen]
        fixed = [args.new_tokens] * len(chosen)
        log(f"{len(chosen)} test sentences; prompts mean {sum(map(len, prompts)) / len(prompts):.1f} tokens; "
            f"reference answers + EOS {min(reference)}-{max(reference)} tokens, mean "
            f"{sum(reference) / len(reference):.1f}")
    dtype = resolve_dtype("auto", device)
    peak_tflops = bandwidth = None
    if device == "cuda":
        with phases("hardware"):
            peak_tflops, bandwidth = common.matmul_peak_tflops(), copy_bandwidth()
            log(f"measured: bf16 matmul {peak_tflops:.0f} TFLOP/s, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    report["hardware"] = {"matmul_tflops": peak_tflops, "copy_bytes_per_s": bandwidth}
    hf_count = min(len(chosen), args.hf_records)

    def measure(name: str, model, form: str, workload: str, path: str, batch: int) -> None:
        targets = fixed if workload == "fixed" else reference
        subset = hf_count if path == "generate" else len(chosen)

        def go(_):
            if path == "generate":
                r = forced_batched(model, tokenizer, prompts[:subset], targets[:subset], batch,
                                   time.perf_counter() + max(20.0, budget.left() / 6), device)
            else:
                r = engine_run(model, tokenizer, prompts[:subset], targets[:subset], batch, device)
            r.update(form=form, workload=workload, path=path, batch=batch)
            if peak_tflops:
                weights = sum(common.weight_bytes(model))
                params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
                n = r["sentences"]
                r["limit_sentences_per_s"] = hardware_limit(prompts[:n], targets[:n], batch, weights, params,
                                                            peak_tflops, bandwidth)
                r["share_of_limit"] = r["sentences_per_s"] / r["limit_sentences_per_s"]
            log(f"{name}: {r['sentences']} sentences in {r['seconds']:.1f}s: {r['sentences_per_s']:.1f} sent/s, "
                f"{r['new_tokens_per_s']:,.0f} new tokens/s, peak {fmt(r.get('peak_gib'), 1)} GiB"
                + (f", {100 * r['share_of_limit']:.0f}% of the limit" if "share_of_limit" in r else "")
                + (f"; engine {r['engine']}" if "engine" in r else ""))
            return r

        if path == "generate" and args.skip_generate:
            return
        if budget.allows(10.0, name):
            with phases(name):
                results[name] = common.guarded(go, device, retry_without_liger=False)

    big = args.engine_batch
    fused = args.fused_kernels == "also" and device == "cuda" and liger_available()

    def engine_paths(name: str, model, form: str, workload: str) -> None:
        measure(f"engine{name} {workload}", model, form, workload, "engine", big)
        if fused:  # the same with Liger's norm, RoPE and SwiGLU (what predict.py's fused_kernels auto does)
            apply_fused_kernels(model)
            measure(f"engine{name} fused {workload}", model, form + " fused", workload, "engine", big)
            remove_fused_kernels(model)

    if args.shape == "qwen0.5b":
        with phases("build"):
            model = build_qwen(args.tiny, len(tokenizer), device, dtype, args.seed)
        for workload in ("fixed", "reference"):
            measure(f"generate-b64 {workload}", model, "bf16", workload, "generate", 64)
            engine_paths("", model, "bf16", workload)
    else:
        from cnqlora.models import LoraArgs, attach_lora

        with phases("build NF4 model"):
            model = common.build_generation_model(args.tiny, len(tokenizer), device, args.seed, dtype)
        if not args.skip_generate:
            with phases("seed loop"):
                r = common.guarded(lambda _: seed_loop(model, tokenizer, records[:args.seed_records + 2],
                                                       args.new_tokens, device, time.perf_counter() + 60), device,
                                   retry_without_liger=False)
                r.update(form="nf4", workload="fixed", path="seed loop", batch=1)
                results["seed-loop fixed"] = r
        lora, _ = attach_lora(model, LoraArgs(lora_r=8))  # the training default: all-linear, r=8
        lora.eval()
        for workload in ("fixed", "reference"):
            measure(f"generate-b64 nf4+lora {workload}", lora, "nf4+lora", workload, "generate", 64)
            engine_paths(" nf4+lora", lora, "nf4+lora", workload)
        model = lora.unload()
        del lora
        with phases("dequantise to a merged 16-bit model"):
            common.dequantize_model(model, dtype)
            common.free_memory(device)
        for workload in ("fixed", "reference"):
            measure(f"generate-b64 merged {workload}", model, "merged bf16", workload, "generate", 64)
            engine_paths(" merged", model, "merged bf16", workload)
    report["elapsed_s"] = common.elapsed()
    common.write_json(args.json, report)
    headers = ["path", "form", "workload", "batch", "sentences", "sent/s", "new tok/s", "peak GiB", "% of limit",
               "status"]
    rows = [[name, r.get("form"), r.get("workload"), r.get("batch"), r.get("sentences"),
             fmt(r.get("sentences_per_s"), 1), fmt(r.get("new_tokens_per_s"), 0), fmt(r.get("peak_gib"), 1),
             fmt(100 * r["share_of_limit"], 0) if "share_of_limit" in r else "n/a", r.get("status")]
            for name, r in results.items()]
    print(common.markdown_table(headers, rows))
    return 1 if any(str(r.get("status", "")).startswith("error") for r in results.values()) else 0


def summary(seconds: float, produced: list[int], status: str) -> dict[str, Any]:
    return {"status": status, "sentences": len(produced), "new_tokens": sum(produced), "seconds": seconds,
            "sentences_per_s": len(produced) / seconds, "new_tokens_per_s": sum(produced) / seconds,
            "min_new_tokens": min(produced), "max_new_tokens": max(produced)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed_records", type=int, default=None,
                        help="sentences timed in the seed's loop, after 2 untimed ones (default 32; --tiny 4)")
    parser.add_argument("--records", type=int, default=None,
                        help="test sentences for the batched paths; 0 = all (default all; --tiny all)")
    parser.add_argument("--batch_size", type=int, default=None, help="batched paths' batch size (default 64; --tiny 8)")
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens generated per sentence, on every path")
    parser.add_argument("--skip_merged", action="store_true", help="do not time the merged 16-bit model")
    parser.add_argument("--suite", choices=("classic", "engine"), default="classic",
                        help="engine: the engine against generate on two workloads (see above)")
    parser.add_argument("--shape", choices=("baichuan7b", "qwen0.5b"), default="baichuan7b",
                        help="engine suite: the model shape (random weights)")
    parser.add_argument("--engine_batch", type=int, default=256, help="engine suite: the engine's KV-cache slots")
    parser.add_argument("--fused_kernels", choices=("off", "also"), default="off",
                        help="engine suite: also: time each engine path again with Liger's fused kernels (GPU)")
    parser.add_argument("--skip_generate", action="store_true", help="engine suite: time the engine paths only")
    parser.add_argument("--hf_records", type=int, default=1024,
                        help="engine suite: sentences for the (slow) generate paths")
    common.add_common_args(parser, time_budget=420.0)
    args = parser.parse_args(argv)
    args.seed_records = args.seed_records if args.seed_records is not None else (4 if args.tiny else 32)
    args.records = args.records or 0
    args.batch_size = args.batch_size or (8 if args.tiny else 64)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "engine":
        return engine_suite(args)
    phases, budget, device, report = common.begin(args)
    results: dict[str, dict[str, Any]] = {}
    report["paths"] = results

    with phases("data"):
        tokenizer, records, chosen, prompts = test_prompts(args)
        batches = list(length_sorted_batches([len(p) for p in prompts], args.batch_size, window=args.batch_size * 8))
        log(f"{len(records)} test sentences; batched paths on {len(chosen)} (prompt mean "
            f"{sum(map(len, prompts)) / len(prompts):.1f} tokens, max {max(map(len, prompts))}); seed loop on "
            f"{min(args.seed_records, len(records) - 2)} after 2 warm-up")

    dtype = resolve_dtype("auto", device)
    with phases("build NF4 model"):
        model = common.build_generation_model(args.tiny, len(tokenizer), device, args.seed, dtype)
        if device == "cuda":
            torch.cuda.empty_cache()
        log(f"weights: {gib(sum(common.weight_bytes(model))):.2f} GiB")

    torch.manual_seed(args.seed)

    def seed_path(_) -> dict[str, Any]:
        r = seed_loop(model, tokenizer, records[:args.seed_records + 2], args.new_tokens, device,
                      common.STARTED + budget.seconds - 60)
        r.update(weights="nf4", decoding="sampling, rep. penalty 1.3", batch=1)
        report_path("seed-loop", r)
        return r

    with phases("seed loop"):
        results["seed-loop"] = common.guarded(seed_path, device, retry_without_liger=False)

    def nf4_path(_) -> dict[str, Any]:
        # Half of what is left for the NF4 pass, the rest for the conversion and the merged pass.
        deadline = time.perf_counter() + max(10.0, (budget.left() - 20) / 2)
        r = batched(model, tokenizer, prompts, batches, args, device, deadline)
        r.update(weights="nf4", decoding="greedy", batch=args.batch_size)
        report_path("batched-nf4", r)
        return r

    with phases("batched NF4"):
        results["batched-nf4"] = nf4 = common.guarded(nf4_path, device, retry_without_liger=False)

    def merged_path(_) -> dict[str, Any]:
        with phases("dequantise to a merged 16-bit model"):
            common.dequantize_model(model, dtype)
            common.free_memory(device)
            log(f"weights: {gib(sum(p.data.nbytes for p in model.parameters())):.2f} GiB")
        with phases("batched merged"):
            same = batches[:nf4["windows"]]  # the same work as the NF4 pass
            r = batched(model, tokenizer, prompts, same, args, device, common.STARTED + budget.seconds)
            r.update(weights=str(dtype).replace("torch.", ""), decoding="greedy", batch=args.batch_size)
            common_rows = [i for i in r["outputs"] if i in nf4["outputs"]]
            r["same_output_as_nf4"] = sum(r["outputs"][i] == nf4["outputs"][i] for i in common_rows) / max(1, len(common_rows))
            report_path("batched-merged", r)
            log(f"merged vs NF4: {r['sentences_per_s'] / nf4['sentences_per_s']:.2f}x the speed; "
                f"{100 * r['same_output_as_nf4']:.0f}% of the greedy outputs identical")
        return r

    if not args.skip_merged and "windows" in nf4 and budget.allows(15.0, "the merged 16-bit model"):
        results["batched-merged"] = common.guarded(merged_path, device, retry_without_liger=False)
    else:
        results["batched-merged"] = {"status": "skipped"}

    for r in results.values():
        r.pop("outputs", None)
    common.add_ratio_to_seed(results, "seed-loop", "sentences_per_s")
    report["elapsed_s"] = common.elapsed()
    common.write_json(args.json, report)
    print_table(results, args)
    failed = [n for n, r in results.items() if str(r.get("status", "")).startswith("error")]
    return 1 if failed else 0


def report_path(name: str, r: dict[str, Any]) -> None:
    log(f"{name}: {r['sentences']} sentences, {r['new_tokens']} new tokens in {r['seconds']:.1f}s: "
        f"{r['sentences_per_s']:.2f} sentences/s, {r['new_tokens_per_s']:,.0f} new tokens/s "
        f"(new tokens per sentence {r['min_new_tokens']}-{r['max_new_tokens']}) [{r['status']}]")


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    nf4, merged = results.get("batched-nf4", {}), results.get("batched-merged", {})
    print()
    if "ratio_to_seed" in nf4 and nf4["ratio_to_seed"]:
        print(f"batched NF4 vs the seed's loop: {nf4['ratio_to_seed']:.1f}x the sentences/s (target: at least 30x)")
    if "sentences_per_s" in merged and "sentences_per_s" in nf4:
        print(f"merged {merged['weights']} vs NF4, batched: {merged['sentences_per_s'] / nf4['sentences_per_s']:.2f}x; "
              f"identical greedy outputs: {100 * merged['same_output_as_nf4']:.0f}%")
    print(f"\n{args.new_tokens} new tokens per sentence on every path (EOS suppressed)\n")
    headers = ["path", "weights", "decoding", "batch", "sentences", "seconds", "sentences/s", "new tokens/s",
               "peak GiB", "vs seed loop", "status"]
    rows = []
    for name in ("seed-loop", "batched-nf4", "batched-merged"):
        r = results.get(name, {"status": "not run"})
        if "sentences_per_s" not in r:
            rows.append([name] + ["n/a"] * 9 + [r.get("status", "")])
            continue
        ratio = r.get("ratio_to_seed")
        rows.append([name, r["weights"], r["decoding"], r["batch"], r["sentences"], fmt(r["seconds"]),
                     fmt(r["sentences_per_s"], 2), fmt(r["new_tokens_per_s"], 0), fmt(r.get("peak_gib"), 2),
                     f"{ratio:.1f}x" if ratio else "n/a", r["status"]])
    print(common.markdown_table(headers, rows))


if __name__ == "__main__":
    sys.exit(main())

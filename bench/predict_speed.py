"""Prediction throughput: the seed's one-at-a-time sampling loop vs predict.py's batched greedy path.

    # on one GPU (about 2-3 minutes; needs the MSRA corpus and Baichuan's tokenizer.model, see --help)
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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.common import fmt, gib, log  # noqa: E402

import torch  # noqa: E402

from cnqlora.data import encode_prompt  # noqa: E402
from cnqlora.generation import GenerationArgs, generate_ids, length_sorted_batches, stop_token_ids  # noqa: E402
from cnqlora.models import resolve_dtype  # noqa: E402


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
    common.sync(device)
    common.reset_peak(device)
    start = time.perf_counter()
    status = "ok"
    for i, record in enumerate(timed):
        one(record)
        if time.perf_counter() > deadline and i < len(timed) - 1:
            status = f"partial: out of time after {i + 1} of {len(timed)} sentences"
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
    common.add_common_args(parser, time_budget=420.0)
    args = parser.parse_args(argv)
    args.seed_records = args.seed_records if args.seed_records is not None else (4 if args.tiny else 32)
    args.records = args.records or 0
    args.batch_size = args.batch_size or (8 if args.tiny else 64)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    phases, budget, device, report = common.begin(args)
    results: dict[str, dict[str, Any]] = {}
    report["paths"] = results

    with phases("data"):
        corpus, tokenizer_path, train_sentences = common.resolve_inputs(args)
        tokenizer = common.load_tokenizer(tokenizer_path)
        _, test = common.load_sentences(corpus, train_sentences)
        records = common.to_records(test)
        chosen = records[:args.records] if args.records else records
        prompts = [encode_prompt(tokenizer, "baichuan", r["instruct"], r["query"]).ids for r in chosen]
        batches = list(length_sorted_batches([len(p) for p in prompts], args.batch_size, window=args.batch_size * 8))
        log(f"{len(records)} test sentences; batched paths on {len(chosen)} (prompt mean "
            f"{sum(map(len, prompts)) / len(prompts):.1f} tokens, max {max(map(len, prompts))}); seed loop on "
            f"{min(args.seed_records, len(records) - 2)} after 2 warm-up")

    dtype = resolve_dtype("auto", device)
    with phases("build NF4 model"):
        model = common.build_model(common.model_config(args.tiny, vocab_size=len(tokenizer)), device, seed=args.seed,
                                   compute_dtype=dtype)
        model.eval()
        # model_config turns the KV cache off for training; generation needs it (the seed had it on).
        model.config.use_cache = True
        model.generation_config.use_cache = True
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

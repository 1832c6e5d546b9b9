"""Where the engine's time goes: the top CUDA kernels of its prefill and decode calls.

    python bench/engine_profile.py --shape qwen0.5b          # on one GPU; random weights
    python bench/engine_profile.py --shape baichuan7b --form merged
    python bench/engine_profile.py --tiny                    # anywhere, in seconds

Runs 1,024 official MSRA test prompts (16 new tokens each) through cnqlora.engine.Engine under
torch.profiler and prints the kernels by total CUDA time (CPU time on the CPU), so a next step
is chosen from a measurement rather than a guess.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.predict_speed import build_qwen, test_prompts  # noqa: E402
from cnqlora.engine import Engine, Request  # noqa: E402
from cnqlora.models import resolve_dtype  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("baichuan7b", "qwen0.5b"), default="qwen0.5b")
    parser.add_argument("--form", choices=("nf4", "merged"), default="merged", help="baichuan7b: NF4 or 16-bit")
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    parser.add_argument("--prefill_tokens", type=int, default=16384, help="the engine's prefill token budget")
    parser.add_argument("--shared_prefix_min", type=int, default=16, help="0: prefill whole prompts")
    parser.add_argument("--timing_only", action="store_true", help="no profiler: the engine's own timings")
    common.add_common_args(parser, time_budget=300.0)
    args = parser.parse_args(argv)
    _, _, device, _ = common.begin(args)
    tokenizer, _, chosen, prompts = test_prompts(args)
    dtype = resolve_dtype("auto", device)
    if args.shape == "qwen0.5b":
        model = build_qwen(args.tiny, len(tokenizer), device, dtype, args.seed)
    else:
        model = common.build_generation_model(args.tiny, len(tokenizer), device, args.seed, dtype)
        if args.form == "merged":
            common.dequantize_model(model, dtype)
    engine = Engine(model, [], tokenizer.pad_token_id, max_batch=256, kv_memory_fraction=0.8,
                    prefill_tokens=args.prefill_tokens, shared_prefix_min=args.shared_prefix_min)
    requests = [Request(p, 16) for p in prompts[:args.records]]
    engine.generate(requests[:300])  # warm-up, CUDA graphs captured
    if args.timing_only:
        engine.generate(requests)
        common.log(f"engine stats: {engine.last_stats}")
        return 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        engine.generate(requests)
    common.log(f"engine stats: {engine.last_stats}")
    # by device time, then by host time: a phase whose host time exceeds its device time is launch-bound
    for key in (("cuda_time_total", "self_cpu_time_total") if device == "cuda" else ("cpu_time_total",)):
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())

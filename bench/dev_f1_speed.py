"""Training's dev-F1 evaluation timed through the engine and through batched generate (the old path).

    python bench/dev_f1_speed.py --model /tmp/qwen-hf --adapter RUN/best_adapter --dev /tmp/msra/dev.txt \\
        --template chat --json $OUT/dev_f1_speed.json

The model is loaded as training holds it (4-bit base + LoRA, unless --quantization none), and
the evaluator is the one training builds: `eval_f1_samples` (500) dev records spread over the
file, greedy answers of up to `eval_max_new_tokens` (96) tokens. Each path runs once, cold, as
in training (the engine allocates its cache and captures its graphs inside the timed call);
both must give the same F1 for the speed-up to mean anything, so both are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model folder")
    parser.add_argument("--adapter", help="a trained adapter folder (default: the base alone)")
    parser.add_argument("--dev", required=True, help="dev records (JSON Lines with instruct/query/answer)")
    parser.add_argument("--template", default="auto", help="prompt template, as in training")
    parser.add_argument("--quantization", default="4bit", help="as in training (4bit, 8bit, none)")
    parser.add_argument("--samples", type=int, default=500, help="dev records, spread over the file")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=64, help="the evaluator's batch size (training's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fused_kernels", default="auto", choices=("auto", "liger", "off"),
                        help="Liger's fused kernels, as training applies them (auto: on a GPU when installed)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)

    from cnqlora.data import PromptArgs, load_records
    from cnqlora.evaluation import DevNerEvaluator
    from cnqlora.inference import load_for_inference
    from cnqlora.models import ModelArgs
    from cnqlora.training import spread

    loaded = load_for_inference(ModelArgs(model_name_or_path=args.model, quantization=args.quantization,
                                          device=args.device), PromptArgs(template=args.template), args.adapter,
                                fused_kernels=args.fused_kernels)
    print(loaded.description, flush=True)
    records = spread(load_records(args.dev), args.samples)
    evaluator = DevNerEvaluator(loaded.tokenizer, loaded.template, records, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens)
    report = {"model": loaded.description, "records": len(records), "max_new_tokens": args.max_new_tokens}
    for engine in ("auto", "hf"):
        evaluator.gen.engine = engine
        began = time.perf_counter()
        result = evaluator(loaded.model)
        seconds = time.perf_counter() - began
        name = "engine" if engine == "auto" else "generate"
        report[name] = {"seconds": round(seconds, 3), "f1": result["micro"]["f1"],
                        "sentences_per_s": round(len(records) / seconds, 2)}
        print(f"{name}: {len(records)} dev records in {seconds:.2f} s ({len(records) / seconds:.1f}/s), "
              f"F1 {100 * result['micro']['f1']:.2f}", flush=True)
    report["speedup"] = round(report["generate"]["seconds"] / report["engine"]["seconds"], 2)
    print(f"speed-up of the engine: {report['speedup']}x", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

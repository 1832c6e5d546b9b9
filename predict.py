"""Use a trained adapter: chat with it, run it over a file (with metrics), average several, or merge it.

    # the seed's command: interactive, single turn, answers streamed
    python predict.py --model_name baichuan --base_model ./model_hub/baichuan-7B \\
        --tokenizer_path ./model_hub/baichuan-7B --lora_model ./checkpoint/baichuan/adapter_model \\
        --with_prompt --interactive
    # fix the instruction (msra: the seed's NER instruction) and type only the sentences
    python predict.py --config checkpoint/baichuan/adapter_model/train_config.yaml \\
        --lora_model checkpoint/baichuan/adapter_model --interactive --instruct msra
    # a file: batched greedy decoding, predictions as JSON Lines, P/R/F1 when it has answers
    python predict.py --config configs/msra_baichuan7b.yaml --lora_model checkpoint/baichuan/adapter_model \\
        --data_file data/msra/test.txt --predictions_file checkpoint/baichuan/test.predictions.jsonl
    # a file with bad records: they are listed and skipped; each prediction's `line` names its record
    python predict.py --config configs/msra_baichuan7b.yaml --lora_model checkpoint/baichuan/adapter_model \\
        --data_file my_test.jsonl --skip_bad_lines
    # the mean of several adapters (e.g. seeds of one recipe) as one adapter: predict or merge it like any other
    python predict.py --average_adapters runs/s42/best_adapter,runs/s43/best_adapter,runs/s44/best_adapter \\
        --average_to checkpoint/soup
    # an OpenAI-compatible server (chat, completions, /v1/ner) and a web page at http://127.0.0.1:8000/
    python predict.py --serve --config configs/msra_baichuan7b.yaml --lora_model checkpoint/baichuan/adapter_model \\
        --instruct msra --types 人名,地名,机构名 [--host 127.0.0.1] [--port 8000] [--api_key @key.txt]
    # merge the adapter into the 16-bit base: a plain Hugging Face folder
    python predict.py --base_model model_hub/baichuan-7B --lora_model checkpoint/baichuan/adapter_model \\
        --merge_to model_hub/baichuan-7B-msra

--config takes model, template and columns from a training config (its other keys are ignored).
"""

import os
import sys

from cnqlora.cli import run_command


def main(argv=None):
    from cnqlora.config import parse_options
    from cnqlora.data import PromptArgs
    from cnqlora.inference import PREDICT_SECTIONS
    from cnqlora.models import ModelArgs
    from cnqlora.serving import ServeArgs
    from cnqlora.training import TRAIN_SECTIONS

    model_args, prompt_args, args, gen, serve_args = parse_options(
        PREDICT_SECTIONS + [ServeArgs], argv, prog="predict.py", description=__doc__, ignored_sections=TRAIN_SECTIONS,
        yaml_sections=[ModelArgs, PromptArgs])
    if args.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    if args.only_cpu:
        model_args.device = "cpu"
    if args.average_to:
        from cnqlora.adapters import average_adapters

        average_adapters(args.average_adapters, args.average_to)
        return 0
    if args.merge_to:
        return merge(model_args, args)
    if serve_args.serve:
        from cnqlora.serving import serve

        return serve(model_args, prompt_args, args, gen, serve_args)
    if not args.interactive and not args.data_file:
        args.interactive = True
    return interactive(model_args, prompt_args, args, gen) if args.interactive else predict(model_args, prompt_args, args, gen)


def merge(model_args, args):
    from cnqlora.adapters import merge_adapter
    from cnqlora.errors import UserError

    if not args.lora_model:
        raise UserError("--merge_to needs --lora_model (the adapter to fold into the base model).")
    from cnqlora.models import resolve_device

    merge_adapter(model_args.model_name_or_path, args.lora_model, args.merge_to, dtype=args.merge_dtype,
                  trust_remote_code=model_args.trust_remote_code, device=resolve_device(model_args.device))


def interactive(model_args, prompt_args, args, gen):
    from cnqlora.inference import interactive as chat
    from cnqlora.inference import load_for_inference

    loaded = load_for_inference(model_args, prompt_args, args.lora_model, args.adapter_mode, args.fused_kernels,
                                args.grounded)
    return chat(loaded, args, gen)


def predict(model_args, prompt_args, args, gen):
    import json

    from cnqlora.inference import describe_run, load_for_inference, predict_file, read_inputs, score_predictions
    from cnqlora.metrics import format_metrics

    items = read_inputs(args.data_file, prompt_args, args)
    if args.limit:
        items = items[:args.limit]
    args.predictions_file = args.predictions_file or f"{args.data_file}.predictions.jsonl"
    loaded = load_for_inference(model_args, prompt_args, args.lora_model, args.adapter_mode, args.fused_kernels,
                                args.grounded)
    print(f"loaded in {loaded.seconds:.1f}s: {loaded.description}")
    run = predict_file(loaded, items, args, gen)
    print(f"{run['predicted']} predicted in {run['seconds']:.1f}s ({run['sentences_per_s']:.2f} sentences/s) "
          f"-> {args.predictions_file}")
    where = describe_run(run)
    if where:
        print(where)
    metrics = score_predictions(args.predictions_file, args.types or run["types"])
    if metrics is not None:
        metrics["speed"] = {"sentences_per_s": run["sentences_per_s"], "seconds": run["seconds"],
                            "batch_size": gen.batch_size, "grounded": args.grounded,
                            "grounding_s": run["grounding_s"], "engine": run["engine"]}
        print(format_metrics(metrics))
        path = args.metrics_file or f"{args.predictions_file}.metrics.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(metrics, f, ensure_ascii=False, indent=2)
        print(f"metrics -> {path}")


if __name__ == "__main__":
    sys.exit(run_command(main))

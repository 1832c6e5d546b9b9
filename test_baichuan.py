"""Check a base model before spending hours training on it: does it load, does it complete text,
how long does it take, how much memory does it use?

    python test_baichuan.py                                         # model_hub/baichuan-7B in 4-bit
    python test_baichuan.py --model_name_or_path model_hub/baichuan-7B --quantization none
    python test_baichuan.py --prompt "中国的首都是"

The default prompt is the seed's: a pretrained Baichuan-7B continues "登鹳雀楼->王之涣\\n夜雨寄北->"
with 李商隐. Exits with a clear message (status 2) when the folder is missing, incomplete or not
a causal language model.
"""

import sys
from dataclasses import dataclass

from cnqlora.cli import run_command
from cnqlora.config import opt

SEED_PROMPT = "登鹳雀楼->王之涣\n夜雨寄北->"


@dataclass
class CheckArgs:
    """Check"""

    prompt: str = opt(SEED_PROMPT, "text to complete")
    max_new_tokens: int = opt(64, "tokens to generate")
    repetition_penalty: float = opt(1.1, "the seed's value for this check")


def main(argv=None):
    import time

    from cnqlora.config import parse_options
    from cnqlora.data import PromptArgs, encode_text
    from cnqlora.generation import GenerationArgs, generate_ids
    from cnqlora.inference import load_for_inference
    from cnqlora.models import ModelArgs

    model_args, args = parse_options([ModelArgs, CheckArgs], argv, prog="test_baichuan.py", description=__doc__)
    # The prompt is completed as raw text, so the template in the description plays no part.
    loaded = load_for_inference(model_args, PromptArgs(), None)
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    print(f"{loaded.description}; class {type(model).__name__}")
    print(f"load time: {loaded.seconds:.1f}s; memory: {memory_gib(device):.2f} GiB "
          f"({'GPU peak' if device != 'cpu' else 'process peak RSS'})")

    ids = encode_text(tokenizer, args.prompt)
    gen = GenerationArgs(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    generate_ids(model, tokenizer, [ids], GenerationArgs(max_new_tokens=2))  # warm-up: kernels, caches
    started = time.time()
    new_ids = generate_ids(model, tokenizer, [ids], gen)[0]
    seconds = time.time() - started
    new_tokens = len(new_ids)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    print(f"generated {new_tokens} tokens in {seconds:.2f}s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s")
    print("-" * 60)
    print(args.prompt + text)
    print("-" * 60)


def memory_gib(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    sys.exit(run_command(main))

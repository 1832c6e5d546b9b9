"""Turn a GGUF file into a plain Hugging Face folder (bf16 safetensors + tokenizer).

    python bench/gguf_to_hf.py /tmp/model.gguf /tmp/qwen-hf

Used to bring the real Qwen2.5-Coder-0.5B-Instruct (shared/tools/qwen05b) to the GPU machine,
which cannot download models. Needs the `gguf` package.
"""

import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(gguf_path: str, out_dir: str) -> None:
    started = time.time()
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The GGUF quantization record must not follow the dequantized weights into the new folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"{out_dir}: written in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main(*sys.argv[1:3])

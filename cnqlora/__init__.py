"""QLoRA instruction fine-tuning for Chinese LLMs (Baichuan-7B first).

The top-level scripts (baichuan_qlora.py, dataset.py, predict.py, test_baichuan.py) are thin
commands over this package; each module owns one concern:

- config: dataclass options, YAML + command-line parsing
- data: reading and validating instruction files, prompt templates, tokenisation and labels
- msra: converting char-tagged NER corpora (MSRA) into instruction files
- baichuan: Baichuan-7B / Baichuan2-7B model and tokenizer, without remote code
- models: loading tokenizers and (quantised) models, attaching LoRA
- training: the training loop, checkpoints, resume, logging
- runs: the run folder on disk: lock, atomic folders, checkpoint checks, file-system faults
- generation: decoding options and the one entry point (answer_many) files, chat and dev F1 use
- engine: continuous batching over a slot KV cache (what answer_many runs on supported models)
- grounded: grounded decoding for NER (answers that parse, entities from the text)
- metrics: entity-level NER metrics
- tiny: tiny models and tokenizers for the demo and the tests
"""

__version__ = "0.1.0"

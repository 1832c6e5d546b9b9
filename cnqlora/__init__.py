"""QLoRA instruction fine-tuning for Chinese LLMs (Baichuan-7B first).

The top-level scripts (baichuan_qlora.py, dataset.py, predict.py, test_baichuan.py) are thin
commands over this package; each module owns one concern:

- config: dataclass options, YAML + command-line parsing
- data: reading and validating instruction files, prompt templates, tokenisation and labels
- msra: converting char-tagged NER corpora (MSRA) into instruction files
- baichuan: Baichuan-7B / Baichuan2-7B model and tokenizer, without remote code
- models: loading tokenizers and (quantised) models, attaching LoRA
- training: the training loop, checkpoints, resume, logging
- metrics: entity-level NER metrics
- tiny: tiny models and tokenizers for the demo and the tests
"""

__version__ = "0.1.0"

"""Train a LoRA adapter on a 4-bit base model (QLoRA), in one command.

    python baichuan_qlora.py                                  # Baichuan-7B on MSRA, the defaults
    python baichuan_qlora.py --config configs/demo.yaml       # tiny CPU demo: the pipeline, not NER quality
    python baichuan_qlora.py --config configs/msra_baichuan7b.yaml --learning_rate 1e-4 --run_name lr1e-4
    python baichuan_qlora.py --config configs/msra_baichuan7b.yaml --resume_from_checkpoint auto

Options come from the defaults below, then the YAML file of --config, then the command line.
The adapter is written to <output_dir>/<run_name>/adapter_model.
"""

import sys

from cnqlora.cli import run_command


def main(argv=None):
    from cnqlora.config import parse_options
    from cnqlora.training import TRAIN_SECTIONS, train

    train(*parse_options(TRAIN_SECTIONS, argv, prog="baichuan_qlora.py", description=__doc__))


if __name__ == "__main__":
    sys.exit(run_command(main))

"""baichuan_qlora.py for the multi-process tests, with one fault added: DIE_AT=RANK:STEP makes that
rank kill itself with SIGKILL once that optimizer step is done (a crashed GPU, the OOM killer)."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnqlora.cli import run_command  # noqa: E402
from cnqlora.config import parse_options  # noqa: E402
from cnqlora.training import TRAIN_SECTIONS, train  # noqa: E402


def main(argv):
    rank, at = (int(x) for x in os.environ["DIE_AT"].split(":"))

    def die(step, **_):
        if step == at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)

    train(*parse_options(TRAIN_SECTIONS, argv, prog="baichuan_qlora.py"), callbacks=[die])


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

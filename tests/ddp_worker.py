"""baichuan_qlora.py for the multi-process tests, with one fault added once an optimizer step is
done, on one rank only: DIE_AT=RANK:STEP kills that rank with SIGKILL (a crashed GPU, the OOM
killer); TERM_AT=RANK:STEP sends it SIGTERM (a scheduler's preemption that reaches it first)."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnqlora.cli import run_command  # noqa: E402
from cnqlora.config import parse_options  # noqa: E402
from cnqlora.training import TRAIN_SECTIONS, train  # noqa: E402

FAULTS = {"DIE_AT": signal.SIGKILL, "TERM_AT": signal.SIGTERM}


def main(argv):
    faults = [(signal_number, *(int(x) for x in os.environ[name].split(":")))
              for name, signal_number in FAULTS.items() if name in os.environ]

    def fault(step, **_):
        for signal_number, rank, at in faults:
            if step == at and int(os.environ["RANK"]) == rank:
                os.kill(os.getpid(), signal_number)

    train(*parse_options(TRAIN_SECTIONS, argv, prog="baichuan_qlora.py"), callbacks=[fault])


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

"""baichuan_qlora.py for the multi-process tests, with one fault on one rank only: once optimizer
step STEP is done, DIE_AT=RANK:STEP kills that rank with SIGKILL (a crashed GPU, the OOM killer)
and TERM_AT=RANK:STEP sends it SIGTERM (a scheduler's preemption that reaches it first); during
step STEP, NAN_AT=RANK:STEP makes that rank's losses NaN (a bad batch)."""

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

    done = {"step": 0}

    def fault(step, **_):
        done["step"] = step
        for signal_number, rank, at in faults:
            if step == at and int(os.environ["RANK"]) == rank:
                os.kill(os.getpid(), signal_number)

    if "NAN_AT" in os.environ:
        import cnqlora.training as training

        rank, at = (int(x) for x in os.environ["NAN_AT"].split(":"))
        real_loss_sum = training.loss_sum

        def nan_in_one_step(model, batch, *args):
            loss = real_loss_sum(model, batch, *args)
            bad = done["step"] + 1 == at and int(os.environ["RANK"]) == rank
            return loss * float("nan") if bad else loss

        training.loss_sum = nan_in_one_step

    train(*parse_options(TRAIN_SECTIONS, argv, prog="baichuan_qlora.py"), callbacks=[fault])


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

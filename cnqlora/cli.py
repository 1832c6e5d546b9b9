"""What every command-line script shares: turning user errors into one message and an exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a script's main(); a UserError becomes `error: ...` on stderr and its exit code."""
    from .errors import EchoedError, Stopped, UserError

    # Keep library chatter (tokenizers' fork warning, HF advisory messages) out of the user's way.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    # peft still asks transformers for this deprecated attribute on every LoRA attach.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return main(argv) or 0
    except EchoedError as e:
        return e.exit_code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:
        # 128 + the signal's number, as a shell reports a process ended by it: not a success.
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""The one error type users see.

Subclassing Hydra's CompactHydraException makes Hydra print just the message (one line, exit 1)
instead of a traceback; HYDRA_FULL_ERROR=1 still shows the full stack for debugging.
"""

from hydra.errors import CompactHydraException


class KdError(CompactHydraException):
    """A problem the user can fix; the message says how."""

    @property
    def reason(self) -> str:
        """The message alone, for another message that gives it context. Always one line: a message
        may quote another library's error, and torchvision's download errors span several."""
        return " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())

    def __str__(self) -> str:
        return f"kd: error: {self.reason}"


class UsageError(KdError):
    """A command line kd cannot parse (a flag without its value): exit status 2, as argparse's."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`), raised like Ctrl-C: half-written files are removed and
    a sweep's summary is written, instead of the process vanishing mid-write."""

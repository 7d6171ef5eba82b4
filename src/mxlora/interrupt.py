"""Ctrl-C and SIGTERM as a request to stop cleanly, for any training loop.

Inside :class:`StopRequests`, SIGINT and SIGTERM no longer raise in the middle of whatever runs.
While a loop is *stoppable* (``with stops.stoppable(): ...``) a signal only sets
:attr:`StopRequests.requested`; the loop checks it between steps (``should_stop=stops.__call__``
or a TRL/transformers callback), saves a checkpoint and returns. Outside that window (loading
data or the model, with nothing yet worth saving) and for a second signal (the user insists),
:class:`Interrupted` is raised at once. Either way the command exits with ``128 + signal``
(130 for SIGINT, 143 for SIGTERM), as shells report a process stopped by that signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived when nothing could be saved (or a second one arrived).

    A ``BaseException`` like ``KeyboardInterrupt``, so that library code catching
    ``Exception`` does not swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process stopped by ``signum`` (130 SIGINT, 143 SIGTERM)."""
    return 128 + signum


class StopRequests:
    """Handle SIGINT/SIGTERM while inside the ``with`` block; restore the old handlers after.

    Attributes:
        requested: a stop signal arrived while the loop was stoppable.
        signum: that signal's number (``None`` before one arrives).
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._stoppable = False
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        """``should_stop`` hook for a training loop: true once a stop was requested."""
        return self.requested

    @property
    def name(self) -> str:
        """``SIGINT`` / ``SIGTERM`` (empty before a signal arrived)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @contextlib.contextmanager
    def stoppable(self) -> Iterator[None]:
        """While inside, a first signal only sets :attr:`requested` (the loop stops itself)."""
        self._stoppable = True
        try:
            yield
        finally:
            self._stoppable = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested or not self._stoppable:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopRequests:
        # Signal handlers can only be set from the main thread; elsewhere (a notebook's worker
        # thread) signals keep their default behaviour and `requested` stays false.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""Output folders that appear whole, and never replace what a user made by accident.

Every command that writes a folder (``train``, ``merge``, ``make-random``, ``make-tiny``) builds
it in a *staging* folder beside the destination, ``<dest>.staging-<pid>`` (same file system, so
the final move is one ``rename``), and swaps it in only once it holds something worth keeping:

* an existing destination that is not an empty folder is refused unless ``overwrite`` is given
  (:func:`check_destination`, called before any work so the refusal is instant);
* with ``overwrite``, the old folder is moved aside (``.<name>.old-<pid>``), the new one renamed
  into its place, and only then is the old one deleted: the old one is never gone before the new
  one is in place;
* a build that fails (or is interrupted) before it is published is deleted; the destination is
  untouched.

A training run publishes itself while the trainer is still writing (at its first complete
checkpoint). :meth:`StagedFolder.publish` with ``keep_link=True`` then leaves a symlink at the
staging path pointing to the destination, so paths already handed to the trainer stay valid;
the link is removed when the folder is closed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from types import TracebackType


class DestinationExists(FileExistsError):
    """The output folder exists (and is not empty) and ``overwrite`` was not given."""


def is_occupied(dest: Path) -> bool:
    """``dest`` exists as a file, a link or a non-empty folder (an empty folder is free)."""
    if dest.is_symlink() or dest.is_file():
        return True
    return dest.is_dir() and any(dest.iterdir())


def check_destination(dest: str | os.PathLike[str], overwrite: bool, flag: str = "--overwrite"):
    """Refuse an occupied ``dest`` unless ``overwrite``.

    Raises:
        DestinationExists: naming the folder and the option that allows replacing it.
    """
    dest = Path(dest)
    if not overwrite and is_occupied(dest):
        raise DestinationExists(
            f"{dest} already exists; pass {flag} to replace it (the old one is kept until the "
            "new one is ready), or choose another name"
        )


def remove_stale_staging(dest: Path) -> None:
    """Delete staging folders/links of ``dest`` left by processes that no longer run."""
    if not dest.parent.is_dir():
        return
    for path in dest.parent.glob(f"{dest.name}.staging-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def swap_in(new: Path, dest: Path) -> None:
    """Put folder ``new`` at ``dest``; an existing ``dest`` is deleted only after the swap."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(new, dest)
        return
    if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
        dest.rmdir()  # an empty folder holds nothing to keep
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)  # put the user's folder back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


class StagedFolder:
    """A folder built at :attr:`path` (beside ``dest``) and swapped into ``dest`` when published.

    Use as a context manager: leaving it normally publishes (unless already published); leaving
    it by an exception (or signal) before publishing deletes the staging folder.

    Args:
        dest: the destination folder.
        overwrite: allow replacing an occupied ``dest``.
        flag: the option name shown when ``dest`` is refused.

    Raises:
        DestinationExists: ``dest`` is occupied and ``overwrite`` is false.
    """

    def __init__(self, dest: str | os.PathLike[str], overwrite: bool, flag: str = "--overwrite"):
        self.dest = Path(dest)
        check_destination(self.dest, overwrite, flag)
        # Parent folders made here are removed again if nothing is published: no trace.
        self._made = [p for p in (self.dest.parent, *self.dest.parent.parents) if not p.exists()]
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.dest)
        self.path = self.dest.with_name(f"{self.dest.name}.staging-{os.getpid()}")
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        self.published = False
        self._linked = False

    def publish(self, keep_link: bool = False) -> None:
        """Swap the staging folder into ``dest`` (once; later calls do nothing).

        Args:
            keep_link: leave a symlink at the staging path pointing to ``dest``, for writers
                that still hold the staging path (removed by :meth:`close`).
        """
        if self.published:
            return
        fsync_tree(self.path)
        swap_in(self.path, self.dest)
        self.published = True
        if keep_link:
            # Relative: the two are siblings, so the link survives a move of their parent.
            self.path.symlink_to(self.dest.name, target_is_directory=True)
            self._linked = True

    def discard(self) -> None:
        """Delete the staging folder if it was never published."""
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self._made:  # innermost first
                with contextlib.suppress(OSError):  # not empty: someone else wrote there
                    parent.rmdir()

    def close(self) -> None:
        """Remove the staging link left by ``publish(keep_link=True)``."""
        if self._linked:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._linked = False

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.publish()
            else:
                self.discard()
        finally:
            self.close()


def fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk, so that a published folder never holds empty files."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

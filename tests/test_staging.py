"""Output folders never replace what a user made by accident, and appear whole; stop signals."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from mxlora.cli import build_parser, main
from mxlora.interrupt import Interrupted, StopRequests
from mxlora.recipes.train import config_and_overrides
from mxlora.staging import DestinationExists, StagedFolder


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_folder(path: Path) -> dict[str, str]:
    """A folder of the user's (with a subfolder), and its digest."""
    (path / "sub").mkdir(parents=True)
    (path / "mine.txt").write_text("made by hand\n")
    (path / "sub" / "data.bin").write_bytes(os.urandom(64))
    return tree_digest(path)


def test_an_occupied_destination_is_refused_and_an_empty_one_is_free(tmp_path):
    dest = tmp_path / "out"
    before = user_folder(dest)
    with pytest.raises(DestinationExists, match=r"out already exists; pass --overwrite"):
        StagedFolder(dest, overwrite=False)
    assert tree_digest(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing staged
    empty = tmp_path / "empty"
    empty.mkdir()
    with StagedFolder(empty, overwrite=False) as staged:
        (staged.path / "new.txt").write_text("new")
    assert (empty / "new.txt").read_text() == "new"


def test_overwrite_replaces_only_once_the_new_folder_is_complete(tmp_path):
    dest = tmp_path / "out"
    before = user_folder(dest)
    # A build that fails keeps the old folder byte for byte and leaves no staging behind.
    with pytest.raises(RuntimeError, match="boom"), StagedFolder(dest, overwrite=True) as staged:
        (staged.path / "half.txt").write_text("half")
        assert tree_digest(dest) == before  # still the user's while building
        raise RuntimeError("boom")
    assert tree_digest(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A build that succeeds replaces it whole.
    with StagedFolder(dest, overwrite=True) as staged:
        (staged.path / "new.txt").write_text("new")
        assert tree_digest(dest) == before
    assert tree_digest(dest) == {"new.txt": hashlib.sha256(b"new").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_midway_leaves_a_link_for_writers_until_closed(tmp_path):
    dest = tmp_path / "run"
    user_folder(dest)
    with StagedFolder(dest, overwrite=True) as staged:
        (staged.path / "checkpoint").write_text("1")
        staged.publish(keep_link=True)
        assert (dest / "checkpoint").read_text() == "1" and not (dest / "mine.txt").exists()
        (staged.path / "later.txt").write_text("2")  # written through the link
        assert (dest / "later.txt").read_text() == "2"
        # An error after publishing keeps what was published.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint", "later.txt"]


def test_stale_staging_of_a_dead_process_is_cleared(tmp_path):
    dest = tmp_path / "out"
    stale = tmp_path / "out.staging-999999999"  # no such pid
    stale.mkdir()
    (stale / "junk").write_text("x")
    with StagedFolder(dest, overwrite=False) as staged:
        (staged.path / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_make_tiny_and_make_random_refuse_an_existing_output(tmp_path, capsys):
    out = tmp_path / "model"
    before = user_folder(out)
    # make-random refuses before any work (20b would take minutes to generate).
    assert main(["make-random", str(out), "--config", "20b"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    small = ["--layers", "1", "--experts", "2", "--experts-per-token", "1", "--hidden", "32"]
    assert main(["make-tiny", str(out), *small]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert tree_digest(out) == before
    # --overwrite anywhere on the line (options and positionals intermixed).
    assert main(["make-tiny", "--overwrite", *small, str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_run_refuses_an_existing_output(tmp_path, capsys):
    out = tmp_path / "seed"
    before = user_folder(out)
    config = tmp_path / "seed.yaml"
    quotes = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "quotes.yaml"
    config.write_text(
        f"runs: [{{config: {quotes}}}]\nmerge: {{run: quotes}}\n"
        f"output: {{root: {tmp_path}, name: seed}}\n"
    )
    assert main(["run", str(config)]) == 1
    assert "seed already exists; pass --overwrite" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_options_and_overrides_parse_in_any_order():
    parser = build_parser()
    args = parser.parse_args(["train", "c.yaml", "a=1", "--overwrite", "b=2"])
    assert (args.config, args.overrides, args.overwrite) == ("c.yaml", ["a=1", "b=2"], True)
    args = parser.parse_args(["train", "--resume", "runs/x", "train.logging_steps=5"])
    assert (args.resume, args.config, args.overrides) == ("runs/x", "train.logging_steps=5", [])
    args = parser.parse_args(["bench", "b.yaml", "steps=2", "--only", "v1", "model=/m"])
    assert (args.config, args.overrides, args.only) == ("b.yaml", ["steps=2", "model=/m"], "v1")
    # train tells its config (the one path) from the overrides wherever it stands.
    args = parser.parse_args(["train", "train.lr=1e-4", "--overwrite", "c.yaml", "data.select=8"])
    assert config_and_overrides(args) == ("c.yaml", ["train.lr=1e-4", "data.select=8"])


def test_stop_requests_turn_signals_into_a_flag_then_an_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        # Nothing worth saving yet: the signal stops at once.
        with pytest.raises(Interrupted) as early:
            os.kill(os.getpid(), signal.SIGINT)
        assert early.value.exit_code == 130 and not stops.requested
        with stops.stoppable():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stops.requested and stops() and stops.name == "SIGTERM"
            # A second signal means "now".
            with pytest.raises(Interrupted) as second:
                os.kill(os.getpid(), signal.SIGTERM)
            assert second.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before

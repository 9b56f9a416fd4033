"""The path a new user walks: every command and flag says what it does and its default, the run directory is
named for the next commands, and the package installs without deprecated metadata."""

import argparse
import os
import re
import sys
from pathlib import Path

import pytest

from backsmooth import cli
from backsmooth.cli.train import link_latest, next_steps

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_says_what_it_does():
    commands = _subparsers()
    assert set(commands) == set(cli.COMMANDS)
    for name, parser in commands.items():
        assert parser.description and len(parser.description) > 10, name


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_flag_has_help_and_its_default(name):
    parser = _subparsers()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        flag = " ".join(action.option_strings)
        if not action.option_strings or action.required:
            continue
        if name == "train" and action.dest not in {"config", "preset", "resume", "overwrite", "no_progress"}:
            # train's flags default to 'not given' (presets and files may set them): the help names the real one
            assert "default" in action.help, f"train {flag}: {action.help}"
        elif action.default not in (None, False, ""):
            assert "default" in action.help, f"{name} {flag}: {action.help}"


def test_help_prints_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    assert re.search(r"--batch-size BATCH_SIZE\s+training batch \(default: 128\)", text)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS passes over the training set (default: 10)" in text
    assert "the demo preset" in text  # where the defaults come from with no flags


def test_runs_latest_names_the_last_default_run_and_never_replaces_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = Path("runs/a-1"), Path("runs/a-2")
    first.mkdir(parents=True)
    second.mkdir()
    assert link_latest(first) == Path("runs/latest") and os.readlink("runs/latest") == "a-1"
    assert link_latest(second) == Path("runs/latest") and os.readlink("runs/latest") == "a-2"
    assert sorted(p.name for p in Path("runs").iterdir()) == ["a-1", "a-2", "latest"]  # no temporary left
    assert link_latest(Path("elsewhere/run")) is None  # --out given: no link beside it
    Path("runs/latest").unlink()
    Path("runs/latest").mkdir()  # the user's own folder of that name
    assert link_latest(first) is None and Path("runs/latest").is_dir() and not Path("runs/latest").is_symlink()


def test_next_steps_name_the_run():
    text = next_steps(Path("runs/bs-digits-1"), Path("runs/latest"))
    assert "backsmooth eval runs/latest" in text and "backsmooth report runs/latest --out runs/latest/report" in text
    assert "backsmooth.load_model('runs/bs-digits-1')" in text  # the stable name, for code kept for later
    spaced = next_steps(Path("my runs/x"), None)
    assert "backsmooth eval 'my runs/x'" in spaced  # quoted for the shell


def test_package_metadata_is_in_todays_form():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # an SPDX expression, not the deprecated table
    assert all((ROOT / name).is_file() for name in project["project"]["license-files"])
    (requirement,) = project["build-system"]["requires"]
    assert re.fullmatch(r"setuptools>=7[7-9][\d.]*,<\d+", requirement)  # SPDX needs 77; an upper bound
    demo = " ".join(project["project"]["optional-dependencies"]["demo"])
    assert "matplotlib" in demo and "pyautoattack" in demo  # what the demo's next commands need

"""Property-based fuzzing of every subcommand: random flag values (wrong type, out of range, empty, huge,
NaN, infinity, strange paths, unicode), random TOML / YAML / JSON config files and random image-folder
trees. Every invocation must either be accepted or exit 2 with one line on stderr, never a traceback,
and change nothing outside its --out and the dataset cache (nothing at all when refused).

Accepted invocations are stopped where the real work would begin (training, timing, attacking) by
`ReachedWork`, so the search stays cheap. Bounded in CI by a fixed seed and example count;
BACKSMOOTH_FUZZ_EXAMPLES=N runs N examples per property (docs/development.md)."""

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from backsmooth import cli, config  # noqa: E402
from backsmooth.evaluation.state import EvaluationState  # noqa: E402
from backsmooth.training import Trainer, bench  # noqa: E402

EXAMPLES = int(os.environ.get("BACKSMOOTH_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


class ReachedWork(Exception):
    """Raised where an accepted invocation would start its real work."""


@pytest.fixture(autouse=True)
def stop_before_work(monkeypatch):
    def stop(*_args, **_kwargs):
        raise ReachedWork

    monkeypatch.setattr(Trainer, "run", stop)
    monkeypatch.setattr(bench, "time_steps", stop)
    monkeypatch.setattr(EvaluationState, "unit", stop)


# --------------------------------------------------------------------------- values

STRANGE = ["", " ", "--help", "-h", "0", "-1", "-0", "1", "2", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "1e-400",
           "8/255", "1/0", "0/0", "0x10", "1.5", "1,5", "99999999999999999999", "true", "none", "null", "ü", "😀",
           "\t",
           "a\nb", "--", "-", "../escape", "/", "/dev/null", "/nonexistent/x", "~", "$HOME", "%s", "{}", "[]"]
values = st.one_of(st.sampled_from(STRANGE), st.text(max_size=12).filter(lambda s: "\x00" not in s),
                   st.integers(-10 ** 20, 10 ** 20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
TRAIN_FLAGS = [f.name for f in config.dataclasses.fields(config.RunConfig) if f.name not in ("out", "cache_dir")]
BOOLEAN = {f.name for f in config.dataclasses.fields(config.RunConfig) if f.type in (bool, "bool")}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --------------------------------------------------------------------------- the invariant


def _snapshot(root: Path, *skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (but under `skip`) with its size and modification time."""
    found = {}
    skipped = [s.resolve() for s in skip]
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if any(Path(path).resolve().is_relative_to(s) for s in skipped):
                continue
            stat = os.lstat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def check_invocation(argv: list[str], root: Path, out: Path) -> tuple[int, str]:
    """Run the CLI in-process inside `root`; assert the documented outcome; return exit code and stderr."""
    before_all, before_outside = _snapshot(root, root / "cache"), _snapshot(root, out, root / "cache")
    stdout, stderr = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(argv)
            except ReachedWork:
                code = 0
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
    finally:
        os.chdir(previous)
    err = stderr.getvalue().strip()
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error:"), (argv, err)
        assert _snapshot(root, root / "cache") == before_all, f"{argv} was refused but wrote files"
    assert _snapshot(root, out, root / "cache") == before_outside, f"{argv} changed files outside {out}"
    return code, err


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder per example (hypothesis reruns a test body many times; tmp_path is per test)."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "inputs").mkdir()
        old = os.environ.get("BACKSMOOTH_CACHE")
        os.environ["BACKSMOOTH_CACHE"] = str(root / "cache")
        try:
            yield root
        finally:
            if old is None:
                os.environ.pop("BACKSMOOTH_CACHE")
            else:
                os.environ["BACKSMOOTH_CACHE"] = old


BASE = ["--dataset", "synthetic", "--epochs", "1", "--no-progress"]


# --------------------------------------------------------------------------- train flags and config files


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), values), min_size=1, max_size=3))
def test_train_flags(pairs):
    with sandbox() as root:
        argv = ["train", *BASE, "--out", str(root / "out" / "run"), "--cache-dir", str(root / "cache")]
        for name, value in pairs:
            argv += [_flag(name)] if name in BOOLEAN else [_flag(name), value]
        check_invocation(argv, root, root / "out")


toml_scalars = st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                         st.booleans(), st.text(max_size=8).filter(lambda s: "\x00" not in s))
config_values = st.recursive(toml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                    st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3)), max_leaves=6)
config_keys = st.one_of(st.sampled_from(TRAIN_FLAGS + ["out", "cache_dir"]), st.text(max_size=10))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan" if value != value else ("inf" if value > 0 else "-inf") if abs(value) == float("inf") else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"


@FUZZ
@given(st.dictionaries(config_keys, config_values, max_size=4), st.sampled_from([".toml", ".yaml", ".json", ".txt"]),
       st.booleans())
def test_train_config_files(mapping, suffix, garble):
    import json

    import yaml

    with sandbox() as root:
        path = root / "inputs" / f"config{suffix}"
        if suffix == ".toml":
            text = "\n".join(f'"{k}" = {_toml_value(v)}' for k, v in mapping.items())
        elif suffix == ".yaml":
            text = yaml.safe_dump(mapping, allow_unicode=True)
        else:
            text = json.dumps(mapping)
        path.write_text(text[: len(text) // 2] + "\x01[" if garble else text, encoding="utf-8")
        argv = ["train", "--config", str(path), *BASE, "--out", str(root / "out" / "run"),
                "--cache-dir", str(root / "cache")]
        check_invocation(argv, root, root / "out")


# --------------------------------------------------------------------------- image-folder trees

FILE_KINDS = ["rgb", "gray", "rgba", "gray16", "palette", "other_size", "zero_byte", "truncated", "text_as_png",
              "text_file", "hidden", "dangling_link", "subfolder", "jpeg"]


def _write_entry(folder: Path, index: int, kind: str, rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    name = folder / f"img{index}.png"
    if kind == "rgb":
        Image.fromarray(pixels).save(name)
    elif kind == "gray":
        Image.fromarray(pixels[:, :, 0]).save(name)
    elif kind == "rgba":
        Image.fromarray(np.dstack([pixels, pixels[:, :, :1]])).save(name)
    elif kind == "gray16":
        Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257).save(name)
    elif kind == "palette":
        Image.fromarray(pixels).convert("P").save(name)
    elif kind == "other_size":
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(name)
    elif kind == "zero_byte":
        name.write_bytes(b"")
    elif kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        name.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "text_as_png":
        name.write_text("not an image")
    elif kind == "text_file":
        (folder / f"notes{index}.txt").write_text("a stray file")
    elif kind == "hidden":
        (folder / f".hidden{index}.png").write_bytes(b"junk")
    elif kind == "dangling_link":
        os.symlink(folder / "missing-target.png", name)
    elif kind == "subfolder":
        (folder / f"sub{index}").mkdir()
    else:
        Image.fromarray(pixels).save(folder / f"img{index}.jpg", quality=75)


@FUZZ
@given(st.lists(st.lists(st.sampled_from(FILE_KINDS), max_size=5), min_size=1, max_size=3),
       st.booleans(), st.integers(0, 2 ** 16))
def test_image_folder_trees(classes, split, seed):
    rng = np.random.default_rng(seed)
    with sandbox() as root:
        data = root / "inputs" / "images"
        for part in ("train", "test") if split else ("",):
            for c, kinds in enumerate(classes):
                folder = data / part / f"class{c}"
                folder.mkdir(parents=True)
                for i, kind in enumerate(kinds):
                    _write_entry(folder, i, kind, rng)
        os.symlink(root / "inputs" / "nowhere", data / "dangling-at-top")
        argv = ["train", "--dataset", "folder", "--data-dir", str(data), "--epochs", "1", "--val-size", "0",
                "--no-progress", "--out", str(root / "out" / "run"), "--cache-dir", str(root / "cache")]
        check_invocation(argv, root, root / "out")


def test_folder_bad_files_each_named_in_one_line(tmp_path):
    """The kinds docs/data.md lists as refused name the file; the kinds it lists as converted, streamed (an image of
    another size) or ignored train."""
    rng = np.random.default_rng(0)
    for kind, refused in (("dangling_link", True), ("zero_byte", True), ("truncated", True), ("text_as_png", True),
                          ("other_size", False), ("gray", False), ("rgba", False), ("gray16", False),
                          ("palette", False), ("hidden", False), ("text_file", False), ("subfolder", False)):
        data = tmp_path / kind / "data"
        for c in range(2):
            (data / f"c{c}").mkdir(parents=True)
            for i in range(3):
                _write_entry(data / f"c{c}", i, "rgb", rng)
        _write_entry(data / "c1", 7, kind, rng)
        out = tmp_path / kind / "run"
        code, err = check_invocation(["train", "--dataset", "folder", "--data-dir", str(data), "--epochs", "1",
                                      "--val-size", "0", "--batch-size", "4", "--no-progress", "--out", str(out),
                                 "--cache-dir", str(tmp_path / kind / "cache")], tmp_path / kind, tmp_path / kind)
        assert code == (2 if refused else 0), kind
        if refused:
            assert "c1" in err and not out.exists(), kind


# --------------------------------------------------------------------------- eval, bench, report, presets


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A one-epoch synthetic run to evaluate and report on (real training: ReachedWork is not set up yet)."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert cli.main(["train", *BASE, "--val-size", "32", "--final-eval-examples", "16", "--val-pgd-steps", "1",
                     "--out", str(out), "--cache-dir", str(out.parent / "cache")]) == 0
    return out


EVAL_FLAGS = ["--attacks", "--dataset", "--data-dir", "--eps", "--step-size", "--n-examples", "--batch-size",
              "--device", "--seed", "--name"]
ATTACK_VALUES = st.one_of(values, st.sampled_from(["pgd20", "pgd0", "cw5x0", "pgd3-norand", "fgsm,fgsm", ",",
                                                   "autoattack", "pgd1x2-norand", "PGD7"]))


def test_eval_step_size_zero_is_refused(trained_run):
    """Regression: a zero step is a null attack whose 'robust accuracy' equals clean accuracy."""
    for step in ("0", "-2/255", "nan", "inf", "2"):
        code, err = check_invocation(["eval", str(trained_run), "--attacks", "pgd20", "--step-size", step,
                                      "--no-progress"], trained_run.parent, trained_run / "nowhere")
        assert code == 2 and "--step-size" in err, err
    assert not list(trained_run.glob("eval-*"))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(EVAL_FLAGS), ATTACK_VALUES), min_size=1, max_size=3))
def test_eval_flags(trained_run, pairs):
    argv = ["eval", str(trained_run), "--no-progress", "--out", str(trained_run.parent / "eval-out")]
    for flag, value in pairs:
        argv += [flag, value]
    check_invocation(argv, trained_run.parent, trained_run.parent / "eval-out")


BENCH_FLAGS = ["--arch", "--methods", "--batch-size", "--image-size", "--channels", "--num-classes", "--eps",
               "--device", "--precision", "--warmup", "--repeats", "--steps", "--epoch-images"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(BENCH_FLAGS), values), min_size=1, max_size=3))
def test_bench_flags(pairs):
    with sandbox() as root:
        argv = ["bench", "--batch-size", "2", "--image-size", "8", "--epoch-images", "0",
                "--json", str(root / "out" / "bench.json")]
        for flag, value in pairs:
            argv += [flag, value]
        check_invocation(argv, root, root / "out")


@pytest.mark.slow
@FUZZ
@given(st.lists(st.one_of(values, st.just("RUN")), min_size=1, max_size=3), values)
def test_report_arguments(trained_run, runs, out_name):
    with sandbox() as root:
        out = root / "out" / (out_name.replace("/", "_").replace("\x00", "") or "report")
        argv = ["report", *[str(trained_run) if r == "RUN" else str(root / "inputs" / r) for r in runs],
                "--out", str(out)]
        check_invocation(argv, root, root / "out")


@pytest.mark.slow
@FUZZ
@given(st.lists(values, max_size=3))
def test_top_level_and_presets(words):
    with sandbox() as root:
        check_invocation(["presets", *words] if words else ["presets"], root, root / "out")
        check_invocation(words or ["bogus"], root, root)  # a bare `train` writes runs/ in the working folder


def test_fuzz_harness_detects_a_traceback(monkeypatch):
    """The invariant is real: a command that raises an unexpected error fails the check."""
    def broken(_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli.presets, "main", broken)
    with sandbox() as root, pytest.raises(RuntimeError, match="boom"):
        check_invocation(["presets"], root, root / "out")


@pytest.mark.parametrize("command", ["train", "eval", "bench", "report", "presets"])
def test_help_of_every_subcommand(command):
    """Regression: a '%' in a help text made `backsmooth train --help` a traceback (argparse formats help)."""
    with sandbox() as root:
        code, _ = check_invocation([command, "--help"], root, root)
    assert code == 0


@pytest.mark.parametrize("flags", [["--batch-size", "100000000"], ["--image-size", "1000000"],
                                   ["--num-classes", "99999999999"], ["--epoch-images", "10000000000000"],
                                   ["--channels", "30000000", "--image-size", "1"]])
def test_bench_refuses_sizes_that_would_exhaust_memory(flags):
    """Regression: the longer fuzz run was killed by the kernel (out of memory) on such values."""
    with sandbox() as root:
        code, err = check_invocation(["bench", *flags], root, root / "out")
    assert code == 2 and ("GiB" in err or "is above" in err)

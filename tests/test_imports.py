"""What a fresh interpreter gets from importing one module: every attack name the registry documents, and TOML
read through `tomli` where the standard library has no `tomllib` (Python 3.10)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def run_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter on this checkout's sources."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("module", ["backsmooth.attacks", "backsmooth.cli"])
def test_autoattack_names_exist_after_one_import(module):
    """AutoAttack's names belong to the attack registry: importing the attacks package alone (not the evaluation
    suite) or the command line, which imports the trainer, is enough to parse them."""
    done = run_python(f"""
        import sys
        import {module}
        from backsmooth.attacks import parse_attacks
        print("evaluation imported:", "backsmooth.evaluation" in sys.modules)
        for spec in parse_attacks("pgd20,autoattack,autoattack-apgd"):
            print(spec.name, spec.runs_in_package, ",".join(spec.components))
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if module == "backsmooth.attacks":
        assert lines[0] == "evaluation imported: False"
    assert lines[1:] == ["pgd20 False ", "autoattack True apgd-ce,apgd-t,fab-t,square",
                         "autoattack-apgd True apgd-ce,apgd-t"]


STUDY_SPEC = """
[protocol]
preset = "cpu-digits-{method}"
epochs = 1
[evaluation]
attacks = ["pgd10"]
n_examples = 100
[[entries]]
method = "fgsm_rs"
"""


def test_toml_falls_back_to_tomli_without_tomllib(tmp_path):
    """With `tomllib` blocked (as on Python 3.10), the command line imports, and config files and study specs
    parse through `tomli`, malformed ones included."""
    pytest.importorskip("tomli")
    (tmp_path / "spec.toml").write_text(STUDY_SPEC)
    (tmp_path / "broken.toml").write_text(STUDY_SPEC + "[[entries\n")
    (tmp_path / "run.toml").write_text('method = "trades"\neps = "8/255"\nepochs = 2\n')
    done = run_python("""
        import sys
        sys.modules["tomllib"] = None  # `import tomllib` now raises ImportError
        import backsmooth.cli
        from backsmooth import config
        from backsmooth.errors import ConfigError
        from backsmooth.study import load_study
        print(config.parse_toml("a = 1")["a"], config.TOMLDecodeError.__module__.split(".")[0])
        print(config.read_file("run.toml"))
        study = load_study("spec.toml", "out")
        print([run.name for run in study.runs], list(study.evaluation.attacks))
        try:
            load_study("broken.toml", "out")
        except ConfigError as error:
            print("refused:", "not valid TOML" in str(error))
    """, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["1 tomli", "{'method': 'trades', 'eps': '8/255', 'epochs': 2}",
                                        "['fgsm_rs-seed0'] ['pgd10']", "refused: True"]

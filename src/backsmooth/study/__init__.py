"""`backsmooth study SPEC.toml`: one protocol, a grid of methods x seeds as ordinary run directories,
resumable at any moment, evaluated and reported together (docs/study.md).

Modules: `spec` (reading and checking the TOML spec), `estimate` (cost in forward passes, time estimates),
`runner` (training, evaluation, progress), `executor` (each run as a submitit job, on SLURM or locally) and
`report` (study.md, the per-entry table)."""

from backsmooth.study.runner import check_existing, dry_run, execute
from backsmooth.study.spec import Evaluation, PlannedRun, Study, load_study

__all__ = ["Evaluation", "PlannedRun", "Study", "check_existing", "dry_run", "execute", "load_study"]

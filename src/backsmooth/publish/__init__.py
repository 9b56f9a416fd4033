"""A robust model leaves the run directory: `export_run` writes a self-describing folder (safetensors weights,
config.json, a model card; RobustBench's model_info on request), `load` brings a model back from such a folder,
a run or the Hugging Face Hub, and `push` uploads a folder to the Hub."""

from backsmooth.publish.export import export_run, read_finished_run, what_robustbench_needs
from backsmooth.publish.hub import is_hub_id, load, push

__all__ = ["export_run", "is_hub_id", "load", "push", "read_finished_run", "what_robustbench_needs"]

"""Loading a published model from wherever it is (an exported folder, a run directory, a model file or a Hugging
Face Hub id), and pushing an exported folder to the Hub. `huggingface_hub` is an optional extra; its download and
upload are the library's own, with its cache and token."""

import re
from pathlib import Path
from types import ModuleType

from torch import nn

from backsmooth.checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS, first_line, load_model
from backsmooth.errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub() -> ModuleType:
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError("the Hugging Face Hub needs huggingface_hub: pip install 'backsmooth[hub]'") from None
    return huggingface_hub


def is_hub_id(source: str | Path) -> bool:
    """'owner/name' that names no local file or folder."""
    return not Path(source).exists() and HUB_ID.fullmatch(str(source)) is not None


def download(repo_id: str) -> Path:
    """The exported folder of Hub repository `repo_id`, downloaded (or taken from the cache) by huggingface_hub."""
    hub = _hub()
    try:
        return Path(hub.snapshot_download(repo_id, allow_patterns=[EXPORT_WEIGHTS, EXPORT_CONFIG, "README.md"]))
    except Exception as exc:  # the library raises many types for network, HTTP and cache errors
        raise ConfigError(f"could not download {repo_id} from the Hugging Face Hub ({first_line(exc)}); check the "
                          f"id and the network, or give a local folder") from None


def load(source: str | Path, device: str = "cpu") -> nn.Module:
    """A trained model in eval mode, its normalisation inside (inputs in [0, 1]), from an exported folder, a run
    directory (best.pt, else last.pt), a model file, or the Hub id of an exported folder ('owner/name')."""
    path = download(str(source)) if is_hub_id(source) else Path(source)
    return load_model(path, device)[0]


def push(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload the exported `folder` to Hub repository `repo_id` (created if missing) with the user's token;
    returns the repository's address."""
    if HUB_ID.fullmatch(repo_id) is None:
        raise ConfigError(f"--push-to-hub needs a Hub repository id like owner/name, got {repo_id!r}")
    hub = _hub()
    token = hub.get_token()
    if not token:
        raise ConfigError(f"no Hugging Face token: run `hf auth login` or set HF_TOKEN; the export in {folder} is "
                          f"complete, push it later with `backsmooth export` to a new --out, or upload that folder")
    try:
        api = hub.HfApi(token=token)
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="backsmooth export")
    except Exception as exc:  # network, HTTP and permission errors come as many types
        raise ConfigError(f"could not push {folder} to the Hub repository {repo_id} ({first_line(exc)}); the "
                          f"export in {folder} is complete") from None
    return str(url)

"""Model folders: `save_pretrained`, `from_pretrained` and `push_to_hub` for VQGAN and
VQGANTransformer. A folder holds `model.safetensors` (the weights; no pickle, nothing in it can
run code) and `config.json` (what the model is: its kind and configs), as model hubs expect.
`from_pretrained` takes such a folder or a Hugging Face Hub repo id ("owner/name"); the Hub is
reached through the `huggingface_hub` package, imported only then (pip install huggingface_hub).
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

from checkpoint import load_checkpoint, save_safetensors
from errors import UserError

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("loading from or pushing to the Hugging Face Hub needs the huggingface_hub package: "
                        "pip install huggingface_hub (or give a local folder).") from None
    return huggingface_hub


def hub_download(repo_id: str, revision: Optional[str] = None) -> str:
    """The local folder of a Hub repo's config.json and model.safetensors (downloaded once into
    the Hub's cache)."""
    hub = _huggingface_hub()
    try:
        return hub.snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # offline, no such repo, no access: the library's errors vary by version
        raise UserError(f"cannot fetch {repo_id} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Check the repo id and the network; "
                        "offline, download the folder elsewhere and give its path.") from None


def hub_upload(folder: str, repo_id: str, private: bool, token: Optional[str], message: str) -> str:
    """Create the repo if needed and upload the folder's files; returns the repo's URL."""
    hub = _huggingface_hub()
    try:
        api = hub.HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message)
    except Exception as e:
        raise UserError(f"cannot push to {repo_id} on the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Log in first (huggingface-cli "
                        "login, or token=...) and check the network.") from None
    return str(url)


def resolve_folder(name_or_path, revision: Optional[str] = None) -> Path:
    """A local model folder, or the downloaded folder of a Hub repo id."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise UserError(f"{path} holds no {WEIGHTS_NAME}: give a folder written by save_pretrained (or "
                            "`python vqgan.py export`).")
        return path
    if path.exists():
        raise UserError(f"{path} is a file: from_pretrained takes a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, "
                        "or a Hub repo id; from_checkpoint reads single checkpoint files.")
    if _REPO_ID.match(str(name_or_path)) and not str(name_or_path).startswith("."):
        return Path(hub_download(str(name_or_path), revision))
    raise UserError(f"{name_or_path} is neither a folder nor a Hugging Face Hub repo id (owner/name).")


def save_folder(folder, meta: dict, state: dict) -> Path:
    """Write a model folder: the state's tensors in model.safetensors, meta in config.json (and in
    the file's metadata). An existing folder's two files are replaced."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({**meta, "model": state}, folder / WEIGHTS_NAME, overwrite=True)
    except OSError as e:
        raise UserError(f"cannot write the model folder {folder} ({e.strerror}): choose a writable path.") from None
    return folder


class PretrainedMixin:
    """save_pretrained / from_pretrained / push_to_hub on top of a class's checkpoint dict:
    `checkpoint_entries()` gives (meta, state) and `from_checkpoint_dict(ckpt, what)` rebuilds."""

    def save_pretrained(self, folder) -> Path:
        """Write config.json and model.safetensors into `folder` (created when needed)."""
        meta, state = self.checkpoint_entries()
        return save_folder(folder, meta, state)

    @classmethod
    def from_pretrained(cls, name_or_path, revision: Optional[str] = None, map_location=None):
        """Load a folder written by save_pretrained, or a Hub repo id holding one (downloaded once
        through huggingface_hub; `revision`: a branch, tag or commit). No pickle is read."""
        folder = resolve_folder(name_or_path, revision)
        ckpt = load_checkpoint(folder / WEIGHTS_NAME, map_location=map_location or "cpu")
        return cls.from_checkpoint_dict(ckpt, str(name_or_path))

    def push_to_hub(self, repo_id: str, private: bool = False, token: Optional[str] = None,
                    commit_message: str = "Upload model") -> str:
        """save_pretrained into a temporary folder and upload it to the Hub repo `repo_id`
        (created when missing). Returns the repo's URL."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return hub_upload(tmp, repo_id, private, token, commit_message)

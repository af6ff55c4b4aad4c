"""Model paths that name a Hugging Face Hub repository (`org/name`, optionally `org/name@revision`).

A model path is a local folder when one exists at that path. Otherwise a path of the form `org/name[@rev]`
is a Hub repo id, resolved with `huggingface_hub.snapshot_download` into the local Hugging Face cache
(HF_HOME / HF_HUB_CACHE): with HF_HUB_OFFLINE=1 only the cached snapshot is used and nothing is downloaded;
online, what is missing is downloaded (weights in safetensors only, no .bin / .pt / .gguf copies). The stages
then read the snapshot folder like any local checkpoint, and the output guard (reap_vlm.outputs) treats the
whole cache as part of the source: nothing is ever written into it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputNotFoundError

# the weights this tool reads are safetensors; other formats of the same weights are not downloaded
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "original/*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?")


def is_repo_id(text: str) -> bool:
    """`org/name` or `org/name@revision`, as the Hub spells repo ids (no `--` or `..`, no `.git` ending)."""
    repo = text.split("@", 1)[0]
    return bool(_REPO_ID.fullmatch(text)) and "--" not in repo and ".." not in repo and not repo.endswith(".git")


def cache_repo_id(folder: Path) -> str | None:
    """`org/name` when `folder` is a snapshot of the Hugging Face cache (…/models--org--name/snapshots/<commit>)."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/")


def resolve(path: Path | None, setting: str) -> Path | None:
    """The folder the stages read for a model path: the path itself when it exists or is not a repo id, else the
    repo's snapshot in the Hugging Face cache (downloaded first unless HF_HUB_OFFLINE is set)."""
    if path is None or Path(path).exists() or not is_repo_id(str(path)):
        return path
    repo_id, _, revision = str(path).partition("@")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{setting}={path}"
    cache = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo_id, revision=revision or None, ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError:
        raise InputNotFoundError(
            f"{shown}: the Hub repository {repo_id} is gated",
            "its files need an accepted licence and a token",
            "Accept the terms on its Hub page and log in (`hf auth login`), or set HF_TOKEN",
        ) from None
    except RepositoryNotFoundError:
        raise InputNotFoundError(
            f"{shown} is neither a local folder nor a Hub repository",
            f"no folder {path} exists and the Hub has no repository {repo_id} (or it is private)",
            "Fix the path or the repo id; for a private repository log in (`hf auth login`) or set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise InputNotFoundError(
            f"{shown}: the Hub repository {repo_id} has no revision {revision!r}",
            "",
            "Use a branch, tag or commit of that repository, or leave out @revision",
        ) from None
    except LocalEntryNotFoundError as err:
        offline = constants.HF_HUB_OFFLINE
        raise InputNotFoundError(
            f"{shown} is not a local folder, and {repo_id} is not (completely) in the Hugging Face cache {cache}",
            "HF_HUB_OFFLINE is set, so nothing is downloaded"
            if offline
            else f"the Hub could not be reached ({type(err.__cause__ or err).__name__})",
            f"Download it first (`hf download {repo_id}`) with network access"
            + ("" if offline else ", or check the network and proxy settings")
            + ", or point the setting at a local folder",
        ) from None
    except HfHubHTTPError as err:
        raise InputNotFoundError(
            f"{shown}: the Hub refused the download of {repo_id}",
            str(err).splitlines()[0][:200],
            "Check the repo id, the token (HF_TOKEN) and the network, or download it first with `hf download`",
        ) from None
    return Path(folder)

"""Fetching checkpoints from the Hugging Face Hub, with errors that say what to do when it fails."""

from __future__ import annotations

from pathlib import Path

from llamakit.errors import CheckpointError

# The weights, their config and the SentencePiece/tiktoken file; Llama 3 repos keep the latter under original/.
HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.model", "original/tokenizer.model"]
META_FILES = ["original/params.json", "original/consolidated.*.pth", "original/tokenizer.model"]


def download(repo_id: str, dest: str | Path, *, token: str | None = None, revision: str | None = None,
             meta: bool = False) -> Path:
    """Download a repository's Llama weights into dest (resumable); return the folder to load."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    dest = Path(dest)
    try:
        snapshot_download(repo_id, local_dir=dest, token=token, revision=revision,
                          allow_patterns=META_FILES if meta else HF_FILES)
    except GatedRepoError:
        raise CheckpointError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, then "
                              "pass --token (or set HF_TOKEN, or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no repository {repo_id!r} on the Hugging Face Hub (or it is private: pass --token); "
                              "check the name, e.g. meta-llama/Llama-3.2-1B") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or commit") from None
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a repository id: {e}; use the form owner/name") from None
    except LocalEntryNotFoundError as e:  # raised when the Hub cannot be reached at all
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"cannot reach the Hugging Face Hub to download {repo_id} ({reason}); connect to the "
                              "internet or set HF_ENDPOINT to a mirror, or copy a checkpoint folder here by other "
                              "means and pass its path instead") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"downloading {repo_id} into {dest} failed: {e}; run the command again to resume") \
            from None
    return dest / "original" if meta else dest

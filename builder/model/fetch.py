"""The model stage inside the image build: get the base weights, then merge the adapter.

Runs as `python -m builder prepare-model` in the build stage. A local model arrives through a
read-only bind mount of the build context; a hub model is downloaded here, with the token read
from the BuildKit secret mount (never an argument, environment variable or layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from builder.errors import BuilderError

TOKEN_FILE = Path("/run/secrets/hub_token")
Source = Literal["local", "huggingface", "modelscope"]


def read_token(path: Path = TOKEN_FILE) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def download(source: Source, model_id: str, revision: str | None, token: str | None = None) -> Path:
    """Snapshot of a hub model (Hugging Face revision `main`, ModelScope `master` by default)."""
    if not model_id:
        raise BuilderError(f"MODEL_SOURCE={source} needs a model id (org/name)")
    if source == "huggingface":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(repo_id=model_id, revision=revision or "main", token=token))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise BuilderError(f"cannot download {model_id}@{revision or 'main'} from Hugging Face: {e}") from None
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_snapshot_download
            from modelscope.hub.api import HubApi
        except ImportError:  # pragma: no cover - the build stage installs it
            raise BuilderError("ModelScope models need the `modelscope` package in the build stage") from None
        if token:
            HubApi().login(token)
        return Path(ms_snapshot_download(model_id, revision=revision or "master"))
    raise BuilderError(f"unknown model source {source!r}")


def prepare_model(
    source: Source,
    model_id: str,
    revision: str | None,
    local: Path,
    adapter: Path | None,
    out: Path,
    dtype: str = "auto",
) -> Path:
    """Base (local or downloaded) + optional adapter -> a servable folder at `out`."""
    from builder.model.merge import merge_model

    if source == "local":
        if not (local / "config.json").is_file():
            raise BuilderError(f"no config.json in {local}: the build context has no model (was MODEL set?)")
        base = local
    else:
        base = download(source, model_id, revision, read_token())
    if adapter is not None and not (adapter.is_dir() and any(adapter.iterdir())):
        adapter = None
    return merge_model(base=base, adapter=adapter, out=out, dtype=dtype, device="cpu", force=False, quiet=True)

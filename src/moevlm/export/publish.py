"""Where an export goes after the folder: an MLflow model version, the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from moevlm.errors import ExportError


def register_in_mlflow(folder: Path, name: str, tracking_uri: str, run_id: str | None) -> str:
    """Log ``folder`` as artifacts of the training run (a new run when there is none) and register it
    as a new version of model ``name`` in that tracking store; returns the version."""
    # Lazy: mlflow takes seconds to import.
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if run_id is None:
            experiment = client.get_experiment_by_name("moevlm-export")
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment("moevlm-export"))
            run_id = client.create_run(experiment_id, run_name=f"export {name}").info.run_id
            client.set_terminated(run_id)
        client.log_artifacts(run_id, str(folder), "hf_export")
        source = f"{client.get_run(run_id).info.artifact_uri}/hf_export"
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="A moevlm model in transformers' LLaVA layout")
        version = client.create_model_version(name, source, run_id=run_id,
                                              tags={"format": "transformers-llava", "exported_by": "moevlm"})
    except MlflowException as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"MLflow at {tracking_uri}: cannot register {name!r}: {reason}") from None
    return version.version


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if needed) with the token from
    HF_TOKEN or the local login; returns the commit URL."""
    # Lazy: only the upload needs it.
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message="Upload a moevlm export")
    except (HfHubHTTPError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"cannot push to the Hub repository {repo_id!r}: {reason}") from None
    return str(getattr(commit, "commit_url", commit))

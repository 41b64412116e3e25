"""Every use of a private Ray or MLflow name, in one place, each with what it waits for upstream.

When a library changes one of these, this module is the one to read; when upstream offers the public
way, the function here shrinks to it and its callers stay as they are. Checked against Ray 2.60.0 and
MLflow 3.17.2 (``constraints.txt``). ``stkd/`` reaches no private name of Ray or MLflow; its one private
torch call (``torch._standard_gamma`` in ``stkd/mixup.py``, a Beta draw from the caller's generator, which
``torch.distributions`` does not take) stays beside its use, since ``stkd/`` runs without ``pipeline/``.
"""

from __future__ import annotations

from typing import Any


def started_ray_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` with no cluster to join),
    so that the cluster is this machine and never grows. Ray has no public flag for it:
    ``ray._private.worker._global_node.head`` is set only on the process that started the head node."""
    from ray._private import worker

    return bool(getattr(worker._global_node, "head", False))


def restored_run_config(tuner) -> Any:
    """The RunConfig a restored ``Tuner`` will run with, to be edited in place: ``Tuner.restore`` takes
    none and runs the pickled one (callbacks, stopper, failure settings of the first command). Private:
    ``Tuner._local_tuner`` (Ray 2.60; ray-project/ray#41364 asks for a public way)."""
    return tuner._local_tuner.get_run_config()


def asha_has_trial(scheduler, trial_id: str) -> bool:
    """Whether an ASHA scheduler already placed this trial in a bracket (one restored from its saved
    state). Private: ``AsyncHyperBandScheduler._trial_info`` (Ray 2.60 has no accessor)."""
    return trial_id in scheduler._trial_info


def split_data_config():
    """A Ray Train ``DataConfig`` that cuts ``train`` into equal shards and every other split into shards
    that keep every row (see :func:`pipeline.data.feeds.split_data_config`).

    Ray's ``DataConfig.configure`` calls ``streaming_split(equal=True)`` for every dataset it splits and
    takes no ``equal`` per dataset, so this is its body (Ray 2.60) with ``equal`` chosen by name. Private:
    ``DataConfig._enable_shard_locality`` and ``DataConfig._resolve_execution_options``."""
    from ray.train import DataConfig

    class SplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                equal = name == "train"
                for i, split in enumerate(ds.streaming_split(world_size, equal=equal, locality_hints=hints)):
                    output[i][name] = split
            return output

    return SplitDataConfig()


def dataset_input_with_profile(source, name: str, digest: str, profile: dict[str, Any]):
    """An MLflow dataset input that carries ``profile`` (the split sizes shown in the UI's dataset
    panel). ``MetaDataset`` has no profile argument, and its ``to_dict`` is what MLflow serializes, so the
    subclass overrides both: public names, but how MLflow reads them is its internals (MLflow 3.17)."""
    import json

    from mlflow.data.meta_dataset import MetaDataset

    class PreparedDatasetInput(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    return PreparedDatasetInput(source, name=name, digest=digest)


def mlflow_global_uris() -> tuple[str | None, str | None]:
    """The tracking and registry URIs set in this process by ``mlflow.set_tracking_uri`` and
    ``set_registry_uri``, None where unset. The public getters answer with a default (the environment, or
    ``./mlruns``) instead, so they cannot say whether anything was set, which putting the settings back
    needs. Private: ``mlflow.tracking._tracking_service.utils._tracking_uri`` and
    ``mlflow.tracking._model_registry.utils._registry_uri`` (MLflow 3.17)."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    return tracking._tracking_uri, registry._registry_uri

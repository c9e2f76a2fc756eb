"""`pb.datasets`: upload a JSONL or CSV file, read one back, list them."""

from pathlib import Path
from typing import Any

from loraplex.api import Api
from loraplex.resources import Dataset


class Datasets:
    def __init__(self, client: Api) -> None:
        self._client = client

    def from_file(self, file_path: str | Path, name: str | None = None, base_model: str = "smollm2-135m") -> Dataset:
        """Upload a file and wait until the server validated it (status `ready`); a bad file raises LoraplexError
        with every bad row in `body["errors"]`. `base_model`: whose tokenizer counts its tokens. `name`: the file
        name without extension if unset."""
        return Dataset.model_validate(self._client.upload_dataset(file_path, name=name, base_model=base_model))

    def from_url(
        self,
        url: str,
        name: str | None = None,
        base_model: str = "smollm2-135m",
        credentials: dict[str, Any] | None = None,
    ) -> Dataset:
        """Create a dataset from `s3://bucket/key`, `gs://bucket/key` or `https://...` and wait until it is validated;
        `credentials` are used for this one read and never stored (see Api.import_dataset)."""
        found = self._client.import_dataset(url, name=name, base_model=base_model, credentials=credentials)
        return Dataset.model_validate(found)

    def get(self, name: str) -> Dataset:
        return Dataset.model_validate(self._client.get_dataset(name))

    def list(self) -> list[Dataset]:
        return [Dataset.model_validate(d) for d in self._client.list_datasets()]


def dataset_name(dataset: str | Dataset) -> str:
    """A dataset argument as Predibase takes it: its name or the object."""
    return dataset if isinstance(dataset, str) else dataset.name

"""Request bodies of /v1/datasets beyond the upload's form fields: POST /v1/datasets/import."""

from pydantic import BaseModel, ConfigDict, Field

from functions.dataset_fetch import Credentials
from functions.webhook_http import MAX_URL_CHARS


class DatasetImport(BaseModel):
    """POST /v1/datasets/import: a dataset from a URL instead of an upload; the other fields are the upload's."""

    model_config = ConfigDict(extra="forbid")  # a field we do not implement is refused, naming it

    url: str = Field(
        max_length=MAX_URL_CHARS,
        description="s3://bucket/key, gs://bucket/key or https://host/path, ending in .jsonl, .json or .csv; an "
        "https host must be public, and redirects are not followed.",
    )
    name: str | None = Field(default=None, description="Dataset name; the file name without extension if unset.")
    base_model: str = Field(default="smollm2-135m", description="Whose tokenizer counts the tokens.")
    wait: bool = Field(default=True, description="Wait for validation and answer 422 with every row error.")
    credentials: Credentials | None = Field(
        default=None,
        description="For this fetch only, never stored: S3 access keys or a GCS service-account key. Unset: an "
        "anonymous read (or the server's own credentials, where its operator allows).",
    )

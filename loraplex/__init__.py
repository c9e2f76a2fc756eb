"""The Loraplex SDK: a client for the REST API that needs httpx and pydantic only (`pip install loraplex`).

from loraplex import Loraplex, SFTConfig

pb = Loraplex(api_key="lpx_...", base_url="http://127.0.0.1:8000")
pb.datasets.from_file("tickets.jsonl", name="tickets")
config = SFTConfig(base_model="smollm2-135m", epochs=3, rank=8)
adapter = pb.adapters.create(config=config, dataset="tickets", repo="triage")  # blocks, printing progress
print(pb.deployments.client("smollm2-135m").generate("Hello", adapter_id=adapter.name).generated_text)
"""

from loraplex.adapters import Adapter
from loraplex.client import Loraplex
from loraplex.configs import DeploymentConfig, DPOConfig, GRPOConfig, SFTConfig
from loraplex.errors import JobFailedError, LoraplexError
from loraplex.generation import Response, StreamResponse
from loraplex.resources import Dataset, Deployment, FinetuningJob, Quote, Repo

__all__ = [
    "Adapter",
    "Dataset",
    "Deployment",
    "DeploymentConfig",
    "DPOConfig",
    "GRPOConfig",
    "FinetuningJob",
    "Quote",
    "JobFailedError",
    "Loraplex",
    "LoraplexError",
    "Repo",
    "Response",
    "SFTConfig",
    "StreamResponse",
]

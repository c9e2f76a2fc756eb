"""`Loraplex`: one API key against one server. Two ways to use it:

from loraplex import Loraplex, SFTConfig

pb = Loraplex(api_key=KEY, base_url="http://127.0.0.1:8000")  # or LORAPLEX_API_KEY, LORAPLEX_API_URL
pb.datasets.from_file("tickets.jsonl", name="tickets")             # the Predibase-style surface
adapter = pb.adapters.create(config=SFTConfig(base_model="smollm2-135m"), dataset="tickets", repo="triage")

job = pb.create_job(base_model="smollm2-135m", dataset="tickets", repo="triage")  # the REST calls, as dicts
for event, data in pb.stream_events(job["id"]):
    print(event, data)
"""

from functools import cached_property

from loraplex.adapters import Adapters
from loraplex.api import FINAL_STATUSES, Api
from loraplex.datasets import Datasets
from loraplex.deployments import Deployments
from loraplex.finetuning import Finetuning
from loraplex.repos import Repos

__all__ = ["FINAL_STATUSES", "Loraplex"]


class Loraplex(Api):
    """The REST calls (loraplex/api.py) and, on top of them, the namespaces Predibase users know: `datasets`,
    `repos`, `adapters`, `finetuning.jobs`, `deployments`, each answering typed objects (loraplex/resources.py)."""

    @cached_property
    def datasets(self) -> Datasets:
        return Datasets(self)

    @cached_property
    def repos(self) -> Repos:
        return Repos(self)

    @cached_property
    def adapters(self) -> Adapters:
        return Adapters(self)

    @cached_property
    def finetuning(self) -> Finetuning:
        return Finetuning(self)

    @cached_property
    def deployments(self) -> Deployments:
        return Deployments(self)

"""`pb.deployments`: private deployments (create, get, list, delete) and `client(name)`, which generates text on one
of them, or on the shared endpoints of a base model when `name` is a base model's (as Predibase's serverless
deployments are named after their base model)."""

from loraplex.api import Api
from loraplex.configs import DeploymentConfig
from loraplex.generation import DeploymentClient
from loraplex.resources import Deployment


class Deployments:
    def __init__(self, client: Api) -> None:
        self._client = client

    def create(self, name: str, config: DeploymentConfig, description: str | None = None) -> Deployment:
        """A private deployment that autoscales between `config.min_replicas` and `max_replicas`; answered at once
        (status Pending or Standby), its replicas starting in the background."""
        fields = config.request_fields() | ({"description": description} if description is not None else {})
        return Deployment.model_validate(self._client.create_deployment(name, **fields))

    def get(self, name: str) -> Deployment:
        return Deployment.model_validate(self._client.get_deployment(name))

    def list(self) -> list[Deployment]:
        return [Deployment.model_validate(d) for d in self._client.list_deployments()]

    def delete(self, name: str, wait: float = 60.0) -> Deployment:
        """Drain the replicas (requests in flight finish) and answer once Deleted, or after `wait` seconds."""
        return Deployment.model_validate(self._client.delete_deployment(name, wait=wait))

    def client(self, name: str) -> DeploymentClient:
        """A LoRAX-style client (`generate`, `generate_stream`) for deployment `name`, or for the shared endpoints
        of base model `name`."""
        return DeploymentClient(self._client, name)

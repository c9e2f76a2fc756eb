"""/v1/webhooks: a tenant's webhook endpoints (create, list, get, update, delete, rotate the secret), each one's
delivery log, a manual re-send and a test event. Endpoints are functions/webhook_endpoints.py; sending, by the
workers and here for a re-send or a test, is functions/webhooks.py.
"""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status

from functions import webhook_endpoints, webhooks
from functions.webhook_endpoints import EndpointConfig, EndpointUpdate, SecretRotation
from web.deps import CurrentTenant, Db
from web.webhook_schemas import DeliveryOut, WebhookEndpointOut, WebhookEndpointWithSecret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


# ---- endpoints ----------------------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED, response_model=WebhookEndpointWithSecret)
def create_endpoint(config: EndpointConfig, tenant: CurrentTenant, db: Db) -> WebhookEndpointWithSecret:
    """Register an endpoint; the answer carries its signing secret, shown this once."""
    endpoint, secret = webhook_endpoints.create(db, tenant.id, config)
    db.commit()
    return WebhookEndpointWithSecret(**webhook_endpoints.shown(endpoint), secret=secret)


@router.get("", response_model=list[WebhookEndpointOut])
def list_endpoints(tenant: CurrentTenant, db: Db) -> list[WebhookEndpointOut]:
    return [WebhookEndpointOut(**webhook_endpoints.shown(e)) for e in webhook_endpoints.listed(db, tenant.id)]


@router.get("/{endpoint_id}", response_model=WebhookEndpointOut)
def get_endpoint(endpoint_id: str, tenant: CurrentTenant, db: Db) -> WebhookEndpointOut:
    return WebhookEndpointOut(**webhook_endpoints.shown(webhook_endpoints.find(db, tenant.id, endpoint_id)))


@router.patch("/{endpoint_id}", response_model=WebhookEndpointOut)
def update_endpoint(endpoint_id: str, change: EndpointUpdate, tenant: CurrentTenant, db: Db) -> WebhookEndpointOut:
    endpoint = webhook_endpoints.update(db, tenant.id, endpoint_id, change)
    db.commit()
    return WebhookEndpointOut(**webhook_endpoints.shown(endpoint))


@router.delete("/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_endpoint(endpoint_id: str, tenant: CurrentTenant, db: Db) -> Response:
    """The endpoint and its delivery log; deliveries not yet sent are dropped."""
    webhook_endpoints.delete(db, tenant.id, endpoint_id)
    db.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecret)
def rotate_secret(
    endpoint_id: str, tenant: CurrentTenant, db: Db, rotation: SecretRotation | None = None
) -> WebhookEndpointWithSecret:
    """A new secret, shown this once; the previous one keeps signing beside it for `overlap_seconds`."""
    rotation = rotation or SecretRotation()
    endpoint, secret = webhook_endpoints.rotate(db, tenant.id, endpoint_id, rotation.overlap_seconds)
    db.commit()
    return WebhookEndpointWithSecret(**webhook_endpoints.shown(endpoint), secret=secret)


# ---- deliveries ---------------------------------------------------------------------------------------------


@router.get("/{endpoint_id}/deliveries", response_model=list[DeliveryOut])
def list_deliveries(
    endpoint_id: str,
    tenant: CurrentTenant,
    db: Db,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    only: Annotated[Literal["pending", "delivered", "failed"] | None, Query(alias="status")] = None,
) -> list[DeliveryOut]:
    """The endpoint's deliveries, newest first, each with its attempts (status code, latency, error)."""
    return [DeliveryOut.of(line) for line in webhooks.delivery_log(db, tenant.id, endpoint_id, limit, only)]


@router.post("/{endpoint_id}/deliveries/{delivery_id}/resend", response_model=DeliveryOut)
def resend_delivery(endpoint_id: str, delivery_id: str, tenant: CurrentTenant, db: Db) -> DeliveryOut:
    """One more attempt now, with the same `webhook-id`; the answer shows it (a failure follows the retry
    schedule)."""
    webhooks.schedule_resend(db, tenant.id, endpoint_id, delivery_id)
    db.commit()
    webhooks.send_now(delivery_id)
    return DeliveryOut.of(webhooks.logged(db, tenant.id, endpoint_id, delivery_id))


@router.post("/{endpoint_id}/test", response_model=DeliveryOut, status_code=status.HTTP_201_CREATED)
def send_test_event(endpoint_id: str, tenant: CurrentTenant, db: Db) -> DeliveryOut:
    """Send a `webhook.test` event to this endpoint only (enabled or not); the answer shows the attempt."""
    delivery_id = webhooks.schedule_test(db, tenant.id, endpoint_id)
    db.commit()
    webhooks.send_now(delivery_id)
    return DeliveryOut.of(webhooks.logged(db, tenant.id, endpoint_id, delivery_id))

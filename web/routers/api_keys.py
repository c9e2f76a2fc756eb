"""/v1/api_keys: a tenant's API keys: create (the secret is answered once), list (never the secret or its hash),
revoke. Calling these needs a key of scope `all` (web/key_scopes.py); the rules are app/tenants.py's."""

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from app import tenants
from app.models import ApiKey
from web.deps import CurrentTenant, Db
from web.schemas import FROM_ROWS, with_values

router = APIRouter(prefix="/v1/api_keys", tags=["api keys"])

MAX_EXPIRY_DAYS = 3650  # ten years; longer is "never", which is no expiry


class ApiKeyCreate(BaseModel):
    """POST /v1/api_keys."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(max_length=100, description="What the key is for, e.g. 'ci' or 'prod-inference'.")
    scope: tenants.Scope = Field(
        default="all", description="all: everything; inference: chat/completions, completions, models; read: GET."
    )
    expires_at: AwareDatetime | None = Field(default=None, description="When it stops working (with a time zone).")
    expires_in_days: StrictInt | None = Field(
        default=None, ge=1, le=MAX_EXPIRY_DAYS, description="Or: days from now until it stops working."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: name the key after what uses it")
        return value.strip()

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError(f"{value.isoformat()} is in the past; a key must expire in the future")
        return value

    @model_validator(mode="after")
    def _one_expiry(self) -> "ApiKeyCreate":
        if self.expires_at is not None and self.expires_in_days is not None:
            raise ValueError("expires_in_days: give expires_at or expires_in_days, not both")
        return self

    def expiry(self, now: datetime) -> datetime | None:
        if self.expires_in_days is not None:
            return now + timedelta(days=self.expires_in_days)
        return self.expires_at


class ApiKeyOut(BaseModel):
    model_config = FROM_ROWS

    id: str
    prefix: str  # the key's first characters, to tell keys apart ("lpx_a1B2c3")
    name: str
    scope: str  # all | inference | read
    status: str  # active | expired | revoked
    created_at: datetime
    last_used_at: datetime | None  # to the minute (app/tenants.py)
    expires_at: datetime | None  # None: never
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str  # the secret: shown in this answer only, never again


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
def create_api_key(body: ApiKeyCreate, tenant: CurrentTenant, db: Db) -> ApiKeyCreated:
    key, raw = tenants.issue_key(db, tenant, name=body.name, scope=body.scope, expires_at=body.expiry(_now()))
    db.commit()
    return ApiKeyCreated.model_validate(with_values(key, status=_status(key), key=raw))


@router.get("", response_model=list[ApiKeyOut])
def list_api_keys(tenant: CurrentTenant, db: Db) -> list[ApiKeyOut]:
    """Every key, revoked and expired ones included, oldest first."""
    return [_shown(key) for key in tenants.list_keys(db, tenant.id)]


@router.delete("/{key_id}", response_model=ApiKeyOut)
def revoke_api_key(key_id: str, tenant: CurrentTenant, db: Db) -> ApiKeyOut:
    """Revoke a key: it is refused from the next request on, in every API process. Refused (409) for the last
    active key, so the tenant keeps a way in."""
    key = tenants.revoke_key(db, tenant.id, key_id)
    db.commit()
    return _shown(key)


def _shown(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut.model_validate(with_values(key, status=_status(key)))


def _status(key: ApiKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= _now():
        return "expired"
    return "active"


def _now() -> datetime:
    return datetime.now(UTC)

"""/v1/billing: balance, credits with expiry, usage this month by category, statements, Checkout and portal."""

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Literal, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, field_validator

from app.models import BillingAccount, Tenant
from app.settings import get_settings
from billing import credits, ledger, statements, views
from billing.prices import MICRO_USD_PER_USD
from web.deps import CurrentTenant, Db
from web.errors import APIError
from web.schemas import Money

if TYPE_CHECKING:
    from billing.stripe_gateway import StripeGateway  # imported on use: it imports the stripe SDK

T = TypeVar("T")
router = APIRouter(prefix="/v1/billing", tags=["billing"])
TOPUP_MIN_USD, TOPUP_MAX_USD = Decimal(5), Decimal(10_000)


class BalanceOut(BaseModel):
    """Built by billing/views.py `balance` (the billing events carry the same)."""

    plan: str
    credit: Money  # spendable now
    pay_as_you_go_this_month: Money  # usage credits did not cover, charged to the card
    payment_method: str | None
    payment_status: str
    can_start_paid_work: bool


class CreditOut(BaseModel):
    """Built by billing/views.py `credit_grant`."""

    id: str
    category: str
    reason: str
    amount: Money
    remaining: Money
    expires_at: datetime | None
    expired: bool


class CategoryOut(BaseModel):
    records: int
    tokens: int
    compute_ms: int
    cost: Money


class MonthUsageOut(BaseModel):
    month: str
    by_category: dict[str, CategoryOut]
    total: Money


class CheckoutIn(BaseModel):
    purpose: Literal["card", "topup"]
    amount_usd: str | None = None  # top-ups only: "25" or "25.50"

    @field_validator("amount_usd", mode="before")
    @classmethod
    def _amount(cls, value: object) -> str | None:
        if value is None:
            return None
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"not a number: {value!r}") from None
        # A finite Decimal's exponent is an int (typeshed also allows the 'n'/'N'/'F' of NaN and infinities)
        if not amount.is_finite() or amount.as_tuple().exponent < -2:  # type: ignore[operator]
            raise ValueError("dollars with at most two decimals, e.g. '25.50'")
        if not TOPUP_MIN_USD <= amount <= TOPUP_MAX_USD:
            raise ValueError(f"between ${TOPUP_MIN_USD} and ${TOPUP_MAX_USD:,}")
        return str(amount)


class UrlOut(BaseModel):
    url: str


@router.get("/balance", response_model=BalanceOut)
def get_balance(tenant: CurrentTenant, db: Db) -> BalanceOut:
    _account(db, tenant)
    return BalanceOut.model_validate(views.balance(db, tenant.id))


@router.get("/credits", response_model=list[CreditOut])
def list_credits(tenant: CurrentTenant, db: Db) -> list[CreditOut]:
    return [
        CreditOut.model_validate(views.credit_grant(s.grant, remaining=s.remaining_micro_usd, expired=s.expired))
        for s in credits.balance(db, tenant.id).grants
    ]


@router.get("/usage", response_model=MonthUsageOut)
def month_usage(tenant: CurrentTenant, db: Db, month: str | None = None) -> MonthUsageOut:
    """Usage of one month (this one by default) by category: finetune, inference, deployment."""
    month = month or _this_month()
    start, end = _bounds(month)
    by_category = {}
    for kind in ledger.KINDS:
        t = ledger.totals(db, tenant.id, since=start, until=end, kind=kind)
        by_category[kind] = CategoryOut(
            records=t.records,
            tokens=t.input_tokens + t.output_tokens,
            compute_ms=t.compute_ms,
            cost=Money.of(t.amount_micro_usd),
        )
    total = sum(c.cost.micro_usd for c in by_category.values())
    return MonthUsageOut(month=month, by_category=by_category, total=Money.of(total))


@router.get("/statements")
def list_statements(tenant: CurrentTenant, db: Db) -> dict[str, list[str]]:
    return {"months": statements.months_with_usage(db, tenant.id)}


@router.get("/statements/{month}", response_model=statements.Statement)
def get_statement(month: str, tenant: CurrentTenant, db: Db) -> statements.Statement:
    _bounds(month)
    return statements.statement(db, tenant.id, month)


@router.post("/checkout", response_model=UrlOut)
def checkout(body: CheckoutIn, tenant: CurrentTenant) -> UrlOut:
    """A Stripe Checkout page: save a card (purpose 'card') or buy credits (purpose 'topup', amount_usd)."""
    if body.purpose == "topup" and body.amount_usd is None:
        raise APIError(422, "amount_usd: required for a top-up", param="amount_usd", code="invalid_value")
    gateway, customer_id = _stripe(tenant)
    amount = int(Decimal(body.amount_usd) * MICRO_USD_PER_USD) if body.amount_usd else None
    base = get_settings().billing.public_url
    url = _call(
        lambda: gateway.checkout_session(
            customer_id,
            body.purpose,
            amount,
            success_url=f"{base}/billing?checkout=done",
            cancel_url=f"{base}/billing?checkout=cancelled",
            tenant_id=tenant.id,
        )
    )
    return UrlOut(url=url)


@router.post("/portal", response_model=UrlOut)
def portal(tenant: CurrentTenant) -> UrlOut:
    """A Stripe customer-portal link: cards, invoices, receipts."""
    gateway, customer_id = _stripe(tenant)
    return UrlOut(
        url=_call(lambda: gateway.portal_session(customer_id, f"{get_settings().billing.public_url}/billing"))
    )


def _account(db: Db, tenant: Tenant) -> BillingAccount:
    account = db.get(BillingAccount, tenant.id)
    if account is None:  # tenants from before billing existed
        account = BillingAccount(tenant_id=tenant.id)
        db.add(account)
        db.commit()
    return account


def _stripe(tenant: Tenant) -> tuple["StripeGateway", str]:
    from billing.outbox import ensure_stripe_customer
    from billing.stripe_gateway import StripeGateway

    gateway = StripeGateway.from_settings()
    if gateway is None:
        raise APIError(503, "payments are not configured on this installation (no Stripe key)", code="no_payments")
    return gateway, _call(lambda: ensure_stripe_customer(gateway, tenant.id))


def _call(fn: Callable[[], T]) -> T:
    """Stripe down: 503, try again. Stripe refusing the call (a customer deleted there, no portal configured): 502
    with Stripe's reason, since nothing in the request was wrong."""
    import stripe

    from billing.stripe_gateway import StripeUnavailable

    try:
        return fn()
    except StripeUnavailable as exc:
        raise APIError(
            503, f"the payment provider is unavailable, try again shortly ({exc})", code="payments_unavailable"
        ) from None
    except stripe.StripeError as exc:
        raise APIError(
            502, f"the payment provider refused the request: {exc.user_message or exc}", code="payments_refused"
        ) from None


def _this_month() -> str:
    now = datetime.now(UTC)
    return f"{now.year:04d}-{now.month:02d}"


def _bounds(month: str) -> tuple[datetime, datetime]:
    try:
        return statements.month_bounds(month)
    except ValueError:
        raise APIError(422, f"month: {month!r} is not YYYY-MM", param="month", code="invalid_value") from None

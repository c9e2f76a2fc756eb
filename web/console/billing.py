"""The billing portal: balance, credits with their expiry, a month's usage by category and by model or adapter, the
monthly statements; buttons to Stripe Checkout (a card, a top-up) and to Stripe's customer portal (static/billing.js
calls the API's own routes for those)."""

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from billing.prices import usd
from billing.statements import Line, Statement
from web.console.render import Page, page
from web.errors import APIError
from web.routers import billing
from web.schemas import Money

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Bar:
    """One bar of a usage chart and its row in the table beside it."""

    label: str  # a category, an adapter ("repo/3") or a base model
    base_model: str | None  # an adapter's base model
    records: int
    tokens: int
    compute_ms: int
    micro_usd: int
    usd: str


@router.get("/billing", response_class=HTMLResponse)
def billing_portal(request: Request, who: Page, month: str | None = None) -> HTMLResponse:
    """The month's usage (this month unless `month`, YYYY-MM, names another), with everything else as of now."""
    this_month = billing._this_month()
    month_error = None
    try:
        usage = billing.month_usage(who.tenant, who.db, month)
    except APIError as refused:  # a hand-typed ?month= that is not YYYY-MM: said beside the selector
        month_error, usage = refused.message, billing.month_usage(who.tenant, who.db, None)
    months = billing.list_statements(who.tenant, who.db)["months"]
    return page(
        request,
        "billing.html",
        who,
        balance=billing.get_balance(who.tenant, who.db),
        credits=billing.list_credits(who.tenant, who.db),
        usage=usage,
        by_category=[
            Bar(kind, None, c.records, c.tokens, c.compute_ms, c.cost.micro_usd, c.cost.usd)
            for kind, c in usage.by_category.items()
        ],
        by_model=by_model(billing.get_statement(usage.month, who.tenant, who.db)),
        month_error=month_error,
        month_choices=sorted({this_month, usage.month, *months}, reverse=True),
        statements=months,
        checkout=request.query_params.get("checkout"),  # "done" | "cancelled": back from Stripe Checkout
        duration=duration,
    )


@router.get("/billing/statements/{month}", response_class=HTMLResponse)
def statement_page(request: Request, month: str, who: Page) -> HTMLResponse:
    statement: Statement | None
    try:
        statement = billing.get_statement(month, who.tenant, who.db)
    except APIError:  # not YYYY-MM: no such statement
        statement = None
    return page(
        request,
        "billing_statement.html",
        who,
        status_code=200 if statement else 404,
        statement=statement,
        month=month,
        usd=usd,
        duration=duration,
    )


def by_model(statement: Statement) -> list[Bar]:
    """The statement's lines summed per adapter ("repo/3"), and per base model for the usage of a base model
    itself, costliest first."""
    groups: dict[tuple[str | None, str], list[Line]] = {}
    for line in statement.lines:
        groups.setdefault((line.adapter, line.base_model), []).append(line)
    bars = [
        Bar(
            adapter or base_model,
            base_model if adapter else None,
            sum(x.records for x in lines),
            sum(x.tokens for x in lines),
            sum(x.compute_ms for x in lines),
            (micro := sum(x.amount_micro_usd for x in lines)),
            Money.of(micro).usd,
        )
        for (adapter, base_model), lines in groups.items()
    ]
    return sorted(bars, key=lambda b: (-b.micro_usd, -b.tokens, b.label))


def duration(ms: int) -> str:
    """Compute time for people: "—", "850 ms", "12.3 s", "4.2 min", "3.5 h"."""
    if ms == 0:
        return "—"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"

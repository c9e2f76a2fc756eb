"""/v1/usage: the tenant's priced usage records and totals, from the ledger."""

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select

from app.models import UsageRecord
from billing import ledger
from web.deps import CurrentTenant, Db
from web.schemas import Money, UsageOut

router = APIRouter(prefix="/v1/usage", tags=["billing"])


class TotalsOut(BaseModel):
    records: int
    input_tokens: int
    output_tokens: int
    compute_ms: int
    cost: Money


class UsageReport(BaseModel):
    records: list[UsageOut]  # newest first, at most `limit`
    totals: TotalsOut  # all records since `since` (all time if unset)
    by_kind: dict[str, TotalsOut]


@router.get("", response_model=UsageReport)
def usage(tenant: CurrentTenant, db: Db, since: datetime | None = None, limit: int = 100) -> UsageReport:
    query = select(UsageRecord).where(UsageRecord.tenant_id == tenant.id)
    if since is not None:
        query = query.where(UsageRecord.created_at >= since)
    rows = db.scalars(query.order_by(UsageRecord.id.desc()).limit(max(1, min(limit, 1000))))
    return UsageReport(
        records=[UsageOut.model_validate(r) for r in rows],
        totals=_totals(ledger.totals(db, tenant.id, since)),
        by_kind={
            k: _totals(ledger.totals(db, tenant.id, since, kind=k)) for k in ("finetune", "inference", "deployment")
        },
    )


def _totals(t: ledger.Totals) -> TotalsOut:
    return TotalsOut(
        records=t.records,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        compute_ms=t.compute_ms,
        cost=Money.of(t.amount_micro_usd),
    )

"""Deployments that stop costing when credit runs out.

A developer tenant with no credit left and no card in good standing (billing/credits.py `paid_work_refusal`) has
its private deployments held: the row's `suspended_reason` says why (the way out included), each runtime keeps a
held deployment at zero replicas and records its move to Standby with that reason (`apply`, every tick, on both
runtimes), and a request that would wake one is refused with 402 (rules.py `unpaid`), as is a new deployment
(web/routers/deployments.py). Nothing is deleted and the tenant's target state is not touched: once credit or a
card returns the reason is cleared, and the autoscaler brings the deployment back as configured (min_replicas).

Who looks:
  - `check`, the periodic look of the runtime that holds the deployments lease (every LORAPLEX_CREDIT_CHECK_SECONDS,
    with the clock it is given): replica time keeps drawing credit, and grants expire with no write at all;
  - `review`, in the transaction of a change of credit or card (web/routers/stripe_webhook.py).
Both also tell the tenant (billing/alerts.py): billing.credit_low on a fall, billing.credit_expired per expiry.
"""

import logging
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import PaymentRequired
from app.models import BillingAccount, CreditGrant, Deployment, Tenant, utcnow
from billing import alerts, credits
from functions.deployments.live import Effects, Live
from functions.deployments.rules import unpaid
from functions.deployments.status import DELETED, PENDING, STANDBY, transition

log = logging.getLogger(__name__)
RESUMED = "credit or a card returned: back as configured"


# ---- who may pay ---------------------------------------------------------------------------------------------


def check(now: datetime | None = None) -> bool:
    """The periodic look: for each developer tenant with a deployment or a grant that expired lately, announce
    expiries and falls of credit, and hold or release its deployments, one transaction per tenant. Returns whether
    a hold changed (the runtime then reads the rows again)."""
    with session_scope() as s:
        tenants = _watched(s, now or utcnow())
    changed = False
    for tenant_id in tenants:
        try:
            with session_scope() as s:
                credits.lock_account(s, tenant_id)  # a top-up commits before or after this look, not inside it
                at = now or utcnow()  # read after the lock, so a top-up committed before it is counted
                balance = credits.balance(s, tenant_id, at)
                alerts.expiries(s, tenant_id, balance, at)
                changed |= review(s, tenant_id, at, balance.credit_micro_usd)
        except Exception:  # noqa: BLE001 - one tenant's failure must not stop the others' holds
            log.exception("the credit check of tenant %s failed", tenant_id)
    return changed


def review(session: Session, tenant_id: str, now: datetime | None = None, credit: int | None = None) -> bool:
    """One tenant, in the caller's transaction: announce a fall of its credit, then hold its deployments if it
    cannot pay, or release them if it can again. `credit` (micro-USD): when the caller has just computed it, after
    credits.lock_account. Returns whether a hold changed."""
    if credit is None:
        credits.lock_account(session, tenant_id)
        credit = credits.balance(session, tenant_id, now).credit_micro_usd
    alerts.credit_moved(session, tenant_id, credit, now)
    return hold(session, tenant_id, credits.paid_work_refusal(session, tenant_id, 1, now, credit=credit))


def hold(session: Session, tenant_id: str, why: str | None) -> bool:
    """Set `why` as the hold of each of the tenant's deployments (None: release them). Returns whether any
    changed."""
    changed = False
    for row in session.scalars(
        select(Deployment).where(Deployment.tenant_id == tenant_id, Deployment.status != DELETED)
    ):
        if row.suspended_reason != why:
            log.info("deployment %s: %s", row.name, f"held in Standby: {why}" if why else RESUMED)
            row.suspended_reason = why
            changed = True
    return changed


def wake_refusal(session: Session, row: Deployment) -> PaymentRequired | None:
    """A request that would start the first replica of a deployment its tenant cannot pay for, refused at once
    (the periodic check may not have held it yet); None when it may go on."""
    if row.status not in (PENDING, STANDBY):
        return None  # replicas are up: they are held, or not, by the check
    why = credits.paid_work_refusal(session, row.tenant_id, 1)
    return unpaid(row.name, why) if why is not None else None


def _watched(session: Session, now: datetime) -> list[str]:
    """Tenants not on enterprise terms that have a deployment, or a grant that expired within the lookback."""
    with_deployments = select(Deployment.tenant_id).where(Deployment.status != DELETED)
    with_expiries = select(CreditGrant.tenant_id).where(
        CreditGrant.expires_at <= now, CreditGrant.expires_at > now - alerts.EXPIRY_LOOKBACK
    )
    enterprise = select(BillingAccount.tenant_id).where(BillingAccount.plan == "enterprise")
    return list(
        session.scalars(
            select(Tenant.id)
            .where(Tenant.id.in_(with_deployments.union(with_expiries)), Tenant.id.not_in(enterprise))
            .order_by(Tenant.id)
        )
    )


# ---- the runtimes' side ----------------------------------------------------------------------------------------


def apply(live: Live, effects: Effects) -> bool:
    """Once per tick on both runtimes, before the replica count is decided: follow the row's hold
    (`live.suspended`, as last read). Returns whether the deployment is held (no replica may run)."""
    before, live.held = live.held, live.suspended
    if live.suspended is not None:
        live.hint = live.suspended  # the move to Standby says why, in whichever tick the last replica goes
        if before != live.suspended and live.status == STANDBY and not live.up():
            transition(live, STANDBY, live.suspended, effects)  # nothing to drain: the hold is recorded as it begins
        return True
    if before is not None:
        live.hint = RESUMED  # explains the start of min_replicas, if any
        if live.status == STANDBY and live.scaling.min_replicas == 0:
            transition(live, STANDBY, f"{RESUMED}: scales up on the next request", effects)
    return False

"""Prices, the usage ledger and (later) Stripe sync. Never imports web or modal."""

"""Stateless handlers and the ML code they run. Never imports web or modal."""

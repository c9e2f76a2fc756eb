"""Wiring: settings, database, volume, queue, runtime and the CLI. Only this package imports modal."""

"""The Loraplex SDK: a client for the REST API that needs httpx and pydantic only (`pip install loraplex`)."""

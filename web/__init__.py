"""The HTTP layer: REST resources, the OpenAI-compatible /v1 API. Thin: rows in, events out."""

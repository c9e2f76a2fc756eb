"""What an API key of each scope may call; web/deps.py asks `refusal` on every authenticated request.

    all        everything
    inference  the inference routes below, on the shared endpoints and on private deployments
    read       GET (and HEAD) of any resource

Managing API keys (/v1/api_keys, even listing them) needs `all`: a key must not mint or see keys wider than itself.
A route is named by its template as the routers declare it, so `{name}` matches every deployment.
"""

KEY_MANAGEMENT_PREFIX = "/v1/api_keys"
READ_METHODS = ("GET", "HEAD")

# (method, route template): the one list of what an `inference` key may call. A new inference route is added here,
# or such keys are refused on it.
INFERENCE_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        # OpenAI-compatible, shared endpoints (web/routers/openai_compat.py)
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        # OpenAI-compatible, private deployments (web/routers/deployment_inference.py)
        ("POST", "/v1/deployments/{name}/chat/completions"),
        ("POST", "/v1/deployments/{name}/completions"),
        # LoRAX's API (web/routers/lorax.py): the shared endpoints, one base model of them, a private deployment
        ("POST", "/"),
        ("POST", "/generate"),
        ("POST", "/generate_stream"),
        ("POST", "/v1/models/{base_model}"),
        ("POST", "/v1/models/{base_model}/generate"),
        ("POST", "/v1/models/{base_model}/generate_stream"),
        ("POST", "/v1/deployments/{name}"),
        ("POST", "/v1/deployments/{name}/generate"),
        ("POST", "/v1/deployments/{name}/generate_stream"),
    }
)

# What each scope allows, in the words of a refusal.
ALLOWS = {
    "all": "every route",
    "inference": "inference only (chat/completions, completions, models, LoRAX's generate)",
    "read": "reading only (GET)",
}


def refusal(scope: str, method: str, route: str) -> str | None:
    """Why a key of `scope` may not call `method route` (a 403's message), or None when it may."""
    if allowed(scope, method, route):
        return None
    needs = " or ".join(f"'{s}'" for s in ALLOWS if allowed(s, method, route))
    what = "managing API keys" if route.startswith(KEY_MANAGEMENT_PREFIX) else f"{method} {route}"
    allows = ALLOWS.get(scope, "nothing")
    return f"this API key's scope is '{scope}', which allows {allows}; {what} needs scope {needs}"


def allowed(scope: str, method: str, route: str) -> bool:
    """A scope this code does not know allows nothing (fail closed)."""
    method = "GET" if method == "HEAD" else method
    if scope == "all":
        return True
    if route.startswith(KEY_MANAGEMENT_PREFIX):
        return False
    if scope == "inference":
        return (method, route) in INFERENCE_ROUTES
    return scope == "read" and method in READ_METHODS

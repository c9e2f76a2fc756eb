"""Wire the console into the app: its static files, its pages, the redirect to sign-in, the security headers."""

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from web.console import adapters, billing, datasets, deployments, finetuning, playground, signin
from web.console.render import HERE, SignInNeeded, sign_in_url
from web.console.security import SecurityHeaders

PAGES = (signin, datasets, finetuning, adapters, playground, deployments, billing)


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in PAGES:
        app.include_router(module.router)
    app.add_exception_handler(SignInNeeded, _to_sign_in)  # type: ignore[arg-type]
    app.add_middleware(SecurityHeaders)


async def _to_sign_in(request: Request, needed: SignInNeeded) -> RedirectResponse:
    return RedirectResponse(sign_in_url(needed.next_path), status_code=303)

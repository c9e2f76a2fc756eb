"""The datasets pages: the list (with the upload), and one dataset."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from web.console.render import Page, page
from web.routers import datasets

router = APIRouter(include_in_schema=False)


@router.get("/datasets", response_class=HTMLResponse)
def dataset_list(request: Request, who: Page) -> HTMLResponse:
    return page(request, "datasets.html", who, datasets=datasets.list_datasets(who.tenant, who.db))

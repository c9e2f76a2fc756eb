"""What the console's browser tests do often: sign in, save a screenshot (.artifacts/console/, kept out of git)."""

from pathlib import Path
from typing import Any

SCREENSHOTS = Path(__file__).resolve().parents[3] / ".artifacts" / "console"


def sign_in(page: Any, api_key: str, next_path: str = "/datasets") -> None:
    page.goto(f"/signin?next={next_path}")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{next_path}")


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

"""Shared endpoints under LORAPLEX_RUNTIME=modal: every inference runs in the GPU serving class and streams back
token by token through the web function, which loads no model; one container pool per base model; an adapter
published after a container started is found (the Volume reloaded first); refusals in the container keep their
kind and field. Driven through the real API (the app `web` builds) with the official `openai` SDK; Modal's lookup
is the in-process stand-in of tests/modal_standin.py, which runs the real serving class on the tiny model.
The class's declarations (GPU, generator method, concurrency, parameters) are read from the Modal objects."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

modal = pytest.importorskip("modal")

from modal_standin import StandInModal, install, serve  # noqa: E402

import app.modal_app as modal_app  # noqa: E402
from conftest import TINY_MODEL, Platform, make_tenant  # noqa: E402
from lora_helpers import build_lora  # noqa: E402

HELLO: list[Any] = [{"role": "user", "content": "Say hi to Ann"}]
# .local() runs the web function's body here, as its container would; it warns that nothing is mounted.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")


@pytest.fixture
def standin(sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInModal]:
    from app.settings import get_settings

    monkeypatch.setenv("LORAPLEX_RUNTIME", "modal")
    monkeypatch.setenv("LORAPLEX_SHARED_REQUESTS_PER_SECOND", "0")
    monkeypatch.setenv("LORAPLEX_FREE_TOKENS_PER_DAY", "0")
    get_settings.cache_clear()
    standin = install(monkeypatch)
    yield standin
    standin.close()


@pytest.fixture
def client(standin: StandInModal) -> Iterator[httpx.Client]:
    # The real entry point: the API with Modal's pools wired in, over real HTTP.
    with serve(modal_app.web.local()) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture
def headers(client: Any) -> dict[str, str]:
    return make_tenant("alice")[1]


def sdk(client: Any, headers: dict[str, str]) -> openai.OpenAI:
    key = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key=key, max_retries=0)


def streamed(api: openai.OpenAI, model: str, max_tokens: int = 12) -> tuple[list[str], str | None]:
    pieces, finish = [], None
    for chunk in api.chat.completions.create(
        model=model, messages=HELLO, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return pieces, finish


def test_a_shared_request_streams_from_the_serving_class_and_the_api_loads_no_model(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    from functions.engine import started_engines

    api = sdk(client, headers)
    pieces, finish = streamed(api, TINY_MODEL)
    assert len(pieces) > 1 and finish == "length"  # token by token, not one blob
    whole = api.chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == "".join(pieces)  # the same greedy answer, from the same pool

    assert standin.lookups and set(standin.lookups) == {("loraplex", "Inference")}
    [container] = standin.containers  # one pool, one container, both requests
    assert container.parameters["base_model"] == TINY_MODEL and container.parameters["deployment"] == ""
    assert container.served == 2
    assert started_engines() == {}  # the web function started no engine of its own


def test_one_pool_per_base_model(
    client: Any, headers: dict[str, str], standin: StandInModal, tiny_model_dir: Path, sqlite_platform: Platform
) -> None:
    # A second base model on the volume: the tiny model's weights under another name (its card makes it a model).
    (sqlite_platform.data_dir / "volume" / "base_models" / "tiny-llama-b").symlink_to(tiny_model_dir)
    api = sdk(client, headers)
    for model in (TINY_MODEL, "tiny-llama-b", TINY_MODEL, "tiny-llama-b"):
        streamed(api, model, max_tokens=2)
    by_model = {c.parameters["base_model"]: c for c in standin.containers}
    assert len(standin.containers) == 2 and set(by_model) == {TINY_MODEL, "tiny-llama-b"}
    assert all(c.served == 2 for c in standin.containers)


def test_an_adapter_published_after_the_container_started_is_found(
    client: Any, headers: dict[str, str], standin: StandInModal, tiny_model_dir: Path, tmp_path: Path
) -> None:
    api = sdk(client, headers)
    streamed(api, TINY_MODEL, max_tokens=2)  # the container is up before the adapter exists
    volume = modal_app.volume
    reloads = volume.calls.count("reload")

    lora = build_lora(tiny_model_dir, tmp_path / "lora")
    files = [("files", (n, (lora / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    r = client.post("/v1/repos/fresh/versions", headers=headers, files=files, data={"base_model": TINY_MODEL})
    assert r.status_code == 201, r.text

    pieces, finish = streamed(api, "fresh/1", max_tokens=6)
    assert pieces and finish == "length"
    assert volume.calls.count("reload") == reloads + 1  # looked at the Volume again before reading the adapter
    [container] = standin.containers  # no redeploy, no new container
    streamed(api, "fresh/1", max_tokens=2)
    assert volume.calls.count("reload") == reloads + 1  # seen once, not reloaded per request


def test_a_refusal_in_the_container_reaches_the_client_with_its_field(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    api = sdk(client, headers)
    too_long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=TINY_MODEL, messages=too_long, max_tokens=2, stream=True)
    assert caught.value.body is not None
    assert caught.value.body["param"] == "messages"  # type: ignore[index]
    assert "context" in caught.value.body["message"]  # type: ignore[index]


def test_a_container_that_dies_mid_stream_ends_the_stream_with_an_error(
    client: Any, headers: dict[str, str], standin: StandInModal
) -> None:
    api = sdk(client, headers)
    stream = api.completions.create(
        model=TINY_MODEL, prompt="Count:", max_tokens=40, stream=True, extra_body={"min_tokens": 40}
    )
    first = next(iter(stream))
    assert first.choices[0].text is not None
    standin.kill(standin.containers[0])
    with pytest.raises(openai.APIError, match="serving container went away"):
        for _ in stream:
            pass


# ---- the declarations, read from the Modal objects ------------------------------------------------------------


def _service_info() -> Any:
    import warnings

    from modal.exception import DeprecationError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationError)
        return modal_app.app.registered_functions["Inference.*"].info()


def test_the_serving_class_declares_a_gpu_generator_method_with_concurrency() -> None:
    info = _service_info()
    assert info.gpus == [(modal_app.SERVE_GPU, 1)]
    assert info.method_names == ["generate"]
    assert info.concurrency_info is not None
    assert info.concurrency_info.max_inputs == modal_app.SERVE_MAX_INPUTS == 64
    assert info.concurrency_info.target_inputs == modal_app.SERVE_TARGET_INPUTS == 16
    assert info.timeout == 10 * 60
    # Whether a method streams is on its partial function, which modal keeps unwrapped (as test_modal_app.py reads
    # the web function's webhook config).
    from modal._utils.async_utils import synchronizer

    partials = modal_app.Inference._get_partial_functions()
    assert synchronizer._translate_in(partials["generate"]).params.is_generator is True
    assert set(partials) >= {"load", "generate", "stop"}


def test_the_serving_class_parameters_are_what_the_pools_pass() -> None:
    from modal.cls import _get_class_constructor_signature

    from app.modal_pools import parameters
    from functions.engine.pool import Pool

    signature = _get_class_constructor_signature(modal_app.Inference._get_user_cls())
    assert set(signature.parameters) == set(parameters(Pool("m")))

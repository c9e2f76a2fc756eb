"""Per-request adapter merging (functions/adapter_merge.py) on the tiny Llama: each method's merged LoRA equals PEFT's
own `add_weighted_adapter` result tensor for tensor (and so the model's logits), the cache (one computation per
recipe, also under concurrent requests), serving in the native engine's mixed batch, the OpenAI API through the
`openai` SDK with `extra_body={"merged_adapters": ...}`, and refusals naming the field."""

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from conftest import TINY_MODEL, Platform, make_tenant
from functions import adapter_merge
from functions.adapter_check import CONFIG_FILE, WEIGHTS_FILE
from functions.adapter_merge import MergeRefused, MergeSpec, merged_ref
from functions.engine.protocol import AdapterRef, GenerationRequest, SamplingParams, collect
from lora_helpers import build_lora

# Three adapters of one rank that differ in what PEFT's merge must handle: B's alpha (scale 4 rather than 2), C's
# rsLoRA scale (alpha / sqrt(r)) and C's target modules (k_proj, which only C has; no o_proj/up/down).
ADAPTERS: dict[str, dict[str, Any]] = {
    "a": {"seed": 1},
    "b": {"seed": 2, "lora_alpha": 16},
    "c": {"seed": 3, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj"]},
}
WEIGHTS = [1.5, -0.7, 0.4]  # a negative weight subtracts: PEFT's sign goes on lora_A only
PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_sources")
    dirs = {name: build_lora(tiny_model_dir, root / name, **options) for name, options in ADAPTERS.items()}
    dirs["rank8"] = build_lora(tiny_model_dir, root / "rank8", seed=4, r=8, lora_alpha=16)
    dirs["dora"] = build_lora(tiny_model_dir, root / "dora", seed=5, use_dora=True)
    return dirs


@pytest.fixture
def tenant(sqlite_platform: Platform, adapter_dirs: dict[str, Path]) -> str:
    """A tenant holding each adapter as version 1 of a repo of its name (and one of another base model)."""
    from functions.repos import publish_adapter

    tenant_id, _ = make_tenant("merger")
    for name, path in adapter_dirs.items():
        config = json.loads((path / CONFIG_FILE).read_text())
        publish_adapter(
            tenant_id,
            name,
            path,
            base_model=TINY_MODEL,
            adapter_type="lora",
            rank=config["r"],
            target_modules=config["target_modules"],
        )
    publish_adapter(  # a row of another base model (its files do not matter: it is refused before they are read)
        tenant_id, "foreign", adapter_dirs["a"], base_model="smollm2-135m", adapter_type="lora", rank=4,
        target_modules=["q_proj"],
    )  # fmt: skip
    return tenant_id


def merge(tenant_id: str, **request: Any) -> AdapterRef:
    from app.db import session_scope

    with session_scope() as s:
        return merged_ref(s, tenant_id, MergeSpec.from_request(request), TINY_MODEL)


def peft_merge(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], seed: int, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> Any:
    """PEFT's own merge of a, b and c with WEIGHTS: the PeftModel with the merged adapter active. DARE draws its masks
    from torch's global generator, which PEFT first uses to initialise the new adapter's weights: it is seeded with
    the recipe's seed after that, right before the merge draws, as ours is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model: Any = PeftModel.from_pretrained(base, adapter_dirs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    lora = model.base_model
    inject = lora.inject_adapter

    def inject_then_seed(*args: Any, **kwargs: Any) -> Any:
        result = inject(*args, **kwargs)
        torch.manual_seed(seed)
        return result

    monkeypatch.setattr(lora, "inject_adapter", inject_then_seed)
    model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "merged", **options)
    model.set_adapter("merged")
    return model.eval()


def logits(model: Any, tiny_model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits


CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.7, "majority_sign_method": "total"}),
]


@pytest.mark.parametrize(("method", "options"), CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_each_method_equals_peft_add_weighted_adapter(
    method: str,
    options: dict[str, Any],
    tenant: str,
    adapter_dirs: dict[str, Path],
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = merge(tenant, ids=["a/1", "b/1", "c"], weights=WEIGHTS, merge_strategy=method, **options)
    seed = json.loads((ref.path / adapter_merge.RECIPE_FILE).read_text())["seed"]
    peft = peft_merge(tiny_model_dir, adapter_dirs, seed, monkeypatch, combination_type=method, **options)

    ours = load_file(str(ref.path / WEIGHTS_FILE))
    theirs = get_peft_model_state_dict(peft, adapter_name="merged")
    assert sorted(ours) == sorted(theirs)
    assert any("k_proj" in key for key in ours)  # the union of target modules (k_proj: c's alone)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key  # bit for bit, DARE's random masks included
    config = json.loads((ref.path / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)

    # Served from our directory by PEFT itself, the merge answers as PEFT's merged model does.
    ours_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ref.path).eval()
    assert torch.equal(logits(ours_model, tiny_model_dir), logits(peft, tiny_model_dir))
    with ours_model.disable_adapter():  # and it changes them
        assert not torch.allclose(logits(ours_model, tiny_model_dir), logits(peft, tiny_model_dir))


def test_dare_masks_are_a_fraction_density_of_entries_rescaled(tenant: str, adapter_dirs: dict[str, Path]) -> None:
    """DARE by its defining property too: with weights (1, 0), the merge's lora_A is a's (times sqrt of its weighted
    scale) where kept, divided by the density, and about `density` of its entries are kept."""
    from safetensors.torch import load_file

    ref = merge(tenant, ids=["a/1", "b/1"], weights=[1.0, 0.0], merge_strategy="dare_linear", density=0.25)
    merged = load_file(str(ref.path / WEIGHTS_FILE))
    source = load_file(str(adapter_dirs["a"] / WEIGHTS_FILE))
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    root = 2.0**0.5  # sqrt(weight 1 · a's scale 8 / 4)
    kept = merged[key] != 0
    assert torch.allclose(merged[key][kept], source[key][kept] * root / 0.25, rtol=1e-6)
    assert 0.15 < kept.float().mean().item() < 0.35  # 512 entries, each kept with probability 0.25


# ---- the cache -------------------------------------------------------------------------------------------------


def test_a_recipe_is_computed_once_and_reused(tenant: str) -> None:
    before = adapter_merge.counts.computed
    first = merge(tenant, ids=["a/1", "b/1"], weights=[0.5, 0.5])
    stamp = (first.path / WEIGHTS_FILE).stat().st_mtime_ns
    again = merge(tenant, ids=["a", "b/1"], weights=[0.5, 0.5], merge_strategy="linear", density=1)  # same recipe
    assert again == first
    assert adapter_merge.counts.computed == before + 1
    assert (first.path / WEIGHTS_FILE).stat().st_mtime_ns == stamp
    other = merge(tenant, ids=["a/1", "b/1"], weights=[0.5, 0.25])
    assert other.key != first.key and other.path != first.path
    assert adapter_merge.counts.computed == before + 2
    assert first.path.parent.name == tenant  # the tenant's own cache


def test_concurrent_requests_compute_once_and_never_see_a_partial_merge(tenant: str) -> None:
    before = adapter_merge.counts.computed
    # A writer that died mid-write leaves only a temporary directory: it is neither served nor in the way.
    ref = merge(tenant, ids=["a/1", "b/1"], weights=[2.0, 1.0], merge_strategy="ties", density=0.4)
    parent = ref.path.parent
    stale = parent / f".{ref.path.name}.crashed.tmp"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half")
    request = {"ids": ["a/1", "c/1"], "weights": [1.0, 3.0], "merge_strategy": "dare_ties", "density": 0.6}
    with ThreadPoolExecutor(6) as pool:
        refs = list(pool.map(lambda _: merge(tenant, **request), range(6)))
    assert len(set(refs)) == 1
    assert adapter_merge.counts.computed == before + 2
    leftovers = sorted(p.name for p in parent.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [stale.name]
    assert sorted(p.name for p in refs[0].path.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, adapter_merge.RECIPE_FILE]
    )


# ---- serving ---------------------------------------------------------------------------------------------------


@pytest.fixture
def engine(sqlite_platform: Platform) -> Iterator[Any]:
    from functions.engine.native import EngineConfig, NativeEngine

    engine = NativeEngine(TINY_MODEL, config=EngineConfig(dtype="fp32", adapter_slots=4, kv_cache_bytes=16 * 2**20))
    yield engine
    engine.close()


def test_served_in_a_mixed_batch_as_when_alone(tenant: str, engine: Any, adapter_dirs: dict[str, Path]) -> None:
    merged = merge(tenant, ids=["a/1", "b/1", "c/1"], weights=WEIGHTS, merge_strategy="ties", density=0.5)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    sources = [AdapterRef(f"src_{n}", adapter_dirs[n], TINY_MODEL) for n in ("a", "b", "c")]

    def run(adapter: AdapterRef | None, prompt: str) -> str:
        return asyncio.run(collect(engine.generate(GenerationRequest(prompt, params, adapter)))).text

    async def batch() -> list[str]:
        requests = [GenerationRequest(PROMPT, params, merged)]
        requests += [GenerationRequest(PROMPT, params, ref) for ref in sources]
        requests += [GenerationRequest("Write a short poem about the sea.", params, None)]
        requests += [GenerationRequest(PROMPT, params, merged)]
        return [c.text for c in await asyncio.gather(*[collect(engine.generate(r)) for r in requests])]

    alone = run(merged, PROMPT)
    together = asyncio.run(batch())
    assert together[0] == together[-1] == alone
    assert together[1:4] == [run(ref, PROMPT) for ref in sources]
    assert alone not in together[1:4]  # the merge is an adapter of its own


# ---- the API -----------------------------------------------------------------------------------------------------


def import_version(client: Any, headers: dict[str, str], repo: str, path: Path) -> str:
    files = [("files", (name, (path / name).read_bytes())) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    r = client.post(f"/v1/repos/{repo}/versions", headers=headers, files=files, data={"base_model": TINY_MODEL})
    assert r.status_code == 201, r.text
    return str(r.json()["name"])


@pytest.fixture
def api(
    sqlite_platform: Platform, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, dict[str, str]]]:
    """A test client and a tenant holding a/1, b/1 and rank8/1, imported through the API."""
    from fastapi.testclient import TestClient

    from web.main import create_app

    monkeypatch.setenv("LORAPLEX_SHARED_REQUESTS_PER_SECOND", "0")  # the refusals come in a burst
    with TestClient(create_app()) as client:
        _, headers = make_tenant("api-merger")
        for name in ("a", "b", "rank8"):
            import_version(client, headers, name, adapter_dirs[name])
        yield client, headers


MERGE = {"ids": ["a/1", "b"], "weights": [0.8, 0.6], "merge_strategy": "dare_ties", "density": 0.5}
HELLO: list[Any] = [{"role": "user", "content": "Say hi to Ann"}]


def test_openai_sdk_with_merged_adapters_answers_as_the_merge_itself(
    api: tuple[Any, dict[str, str]], sqlite_platform: Platform
) -> None:
    client, headers = api
    sdk = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=headers["Authorization"].removeprefix("Bearer "),
        http_client=client,
        max_retries=0,
    )
    options: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
    merged = sdk.chat.completions.create(
        model=TINY_MODEL, messages=HELLO, extra_body={"merged_adapters": MERGE}, **options
    )
    assert merged.model == TINY_MODEL and merged.choices[0].message.content
    # The merged directory is a PEFT adapter like any other: imported as a version, it answers the same.
    (cached,) = (sqlite_platform.data_dir / "volume" / "merged_adapters").glob("*/*")
    name = import_version(client, headers, "merged", cached)
    direct = sdk.chat.completions.create(model=name, messages=HELLO, **options)
    assert merged.choices[0].message.content == direct.choices[0].message.content
    base = sdk.chat.completions.create(model=TINY_MODEL, messages=HELLO, **options)
    assert base.choices[0].message.content != merged.choices[0].message.content
    # Text completions take it too, streaming as well.
    text = sdk.completions.create(model=TINY_MODEL, prompt=PROMPT, extra_body={"merged_adapters": MERGE}, **options)
    stream = sdk.completions.create(
        model=TINY_MODEL, prompt=PROMPT, stream=True, extra_body={"merged_adapters": MERGE}, **options
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text.choices[0].text
    usage = client.get("/v1/usage", headers=headers, params={"limit": 100}).json()["records"]
    assert {r["adapter"] for r in usage if r["kind"] == "inference"} >= {"a/1+b", "merged/1"}
    assert len(list(cached.parent.iterdir())) == 1  # one recipe, one merge, however often it was asked for


Refusal = tuple[dict[str, Any], str]  # (request fields over HELLO's chat, the param the 400 names)
REFUSALS: dict[str, Callable[[], Refusal]] = {
    "unknown adapter": lambda: ({"merged_adapters": {"ids": ["a/1", "nope/1"]}}, "merged_adapters.ids.1"),
    "another tenant's or missing version": lambda: (
        {"merged_adapters": {"ids": ["a/9", "b/1"]}},
        "merged_adapters.ids.0",
    ),
    "different ranks": lambda: ({"merged_adapters": {"ids": ["a/1", "rank8/1"]}}, "merged_adapters.ids.1"),
    "base model in ids": lambda: ({"merged_adapters": {"ids": ["a/1", TINY_MODEL]}}, "merged_adapters.ids.1"),
    "one adapter": lambda: ({"merged_adapters": {"ids": ["a/1"]}}, "merged_adapters.ids"),
    "named twice": lambda: ({"merged_adapters": {"ids": ["a/1", "a/1"]}}, "merged_adapters.ids.1"),
    "weights and ids differ in length": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "weights": [1.0]}},
        "merged_adapters.weights",
    ),
    "unknown method": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "merge_strategy": "svd"}},
        "merged_adapters.merge_strategy",
    ),
    "density above 1": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "merge_strategy": "ties", "density": 1.5}},
        "merged_adapters.density",
    ),
    "density 0": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "merge_strategy": "dare_linear", "density": 0.0}},
        "merged_adapters.density",
    ),
    "density missing for ties": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "merge_strategy": "ties"}},
        "merged_adapters.density",
    ),
    "density with linear": lambda: (
        {"merged_adapters": {"ids": ["a/1", "b/1"], "density": 0.5}},
        "merged_adapters.density",
    ),
    "sign method with dare_linear": lambda: (
        {
            "merged_adapters": {
                "ids": ["a/1", "b/1"],
                "merge_strategy": "dare_linear",
                "density": 0.5,
                "majority_sign_method": "total",
            }
        },
        "merged_adapters.majority_sign_method",
    ),  # fmt: skip
    "unknown sign method": lambda: (
        {
            "merged_adapters": {
                "ids": ["a/1", "b/1"],
                "merge_strategy": "ties",
                "density": 0.5,
                "majority_sign_method": "mean",
            }
        },
        "merged_adapters.majority_sign_method",
    ),  # fmt: skip
    "model is an adapter": lambda: ({"model": "a/1", "merged_adapters": {"ids": ["a/1", "b/1"]}}, "model"),
}


def test_bad_merges_are_400_naming_the_field(api: tuple[Any, dict[str, str]]) -> None:
    client, headers = api
    for case, make in REFUSALS.items():
        fields, param = make()
        r = client.post("/v1/chat/completions", headers=headers, json={"model": TINY_MODEL, "messages": HELLO} | fields)
        assert r.status_code == 400, (case, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (case, error)
        assert error["message"].startswith(param), (case, error)
    # The service goes on: a good merge right after.
    r = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4, "merged_adapters": {"ids": ["a/1", "b/1"]}},
    )
    assert r.status_code == 200, r.text


def test_adapters_of_another_base_model_or_dora_are_refused(tenant: str) -> None:
    with pytest.raises(MergeRefused) as foreign:
        merge(tenant, ids=["a/1", "foreign/1"])
    assert foreign.value.field == "merged_adapters.ids.1"
    assert "smollm2-135m" in foreign.value.message
    with pytest.raises(MergeRefused) as dora:
        merge(tenant, ids=["dora/1", "a/1"])
    assert dora.value.field == "merged_adapters.ids.0"
    with pytest.raises(MergeRefused) as lorax_field:  # LoRAX's routes name their own place for it
        MergeSpec.from_request({"ids": ["a/1"]}, field="parameters.merged_adapters")
    assert lorax_field.value.field == "parameters.merged_adapters.ids"

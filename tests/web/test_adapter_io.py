"""Adapter import and export through the real app: a PEFT LoRA built here on the tiny model is imported as
files, .tar.gz and .zip, served through /v1/chat/completions exactly as plain transformers + PEFT generates
with it, exported and loaded back with PeftModel; bad uploads are refused by name and leave nothing behind."""

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save
from sqlalchemy import func, select

from app.db import session_scope
from app.models import AdapterVersion, Repo
from conftest import TINY_MODEL, InProcessWorker, Platform, make_tenant
from lora_helpers import TARGETS, build_lora

MESSAGES = [{"role": "user", "content": "Triage this support ticket: my parcel arrived damaged."}]
MAX_TOKENS = 16
Files = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return build_lora(base, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def rank32_lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine rank-32 LoRA: above LORAPLEX_MAX_LORA_RANK (16), so no engine here would serve it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return build_lora(base, tmp_path_factory.mktemp("rank32") / "adapter", r=32, lora_alpha=64)


@pytest.fixture(scope="module")
def foreign_lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The same kind of adapter, made for a Llama with hidden size 32 instead of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((tiny_model_dir / "config.json").read_text())
    small = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return build_lora(LlamaForCausalLM(small), tmp_path_factory.mktemp("foreign") / "adapter")


def greedy_reference(model_dir: Path, adapter: Path | None) -> str:
    """What plain transformers (+ PEFT) answers to MESSAGES, greedy, as the chat endpoint presents them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from functions.prompts import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.tensor([encode_chat(tokenizer, MESSAGES)])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, lora_dir: Path) -> dict[str, str]:
    return {"base": greedy_reference(tiny_model_dir, None), "adapter": greedy_reference(tiny_model_dir, lora_dir)}


# ---- helpers -------------------------------------------------------------------------------------------


def peft_files(directory: Path, *names: str) -> Files:
    return [
        (name, (directory / name).read_bytes())
        for name in names or ("adapter_config.json", "adapter_model.safetensors")
    ]


def tar_gz(members: Files, folder: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: Files) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def import_files(
    client: TestClient, headers: dict[str, str], repo: str, files: Files, base_model: str = TINY_MODEL
) -> httpx.Response:
    return client.post(
        f"/v1/repos/{repo}/versions",
        headers=headers,
        files=[("files", (name, data)) for name, data in files],
        data={"base_model": base_model},
    )


def import_archive(
    client: TestClient, headers: dict[str, str], repo: str, data: bytes, filename: str = "adapter.tar.gz"
) -> httpx.Response:
    return client.post(
        f"/v1/repos/{repo}/versions",
        headers=headers,
        files={"archive": (filename, data)},
        data={"base_model": TINY_MODEL},
    )


def chat(client: TestClient, headers: dict[str, str], model: str) -> str:
    r = client.post(
        "/v1/chat/completions",
        headers=headers,
        json={"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def adapters_on_volume(platform: Platform) -> list[str]:
    """Every path under volume/adapters, hidden staging folders included."""
    root = platform.data_dir / "volume" / "adapters"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def row_counts() -> tuple[int, int]:
    with session_scope() as s:
        return s.scalar(select(func.count(Repo.id))) or 0, s.scalar(select(func.count(AdapterVersion.id))) or 0


def download(client: TestClient, headers: dict[str, str], name: str, dest: Path) -> Path:
    """Download `repo/N` and unpack it into `dest`; returns the adapter folder."""
    repo, version = name.split("/")
    r = client.get(f"/v1/repos/{repo}/versions/{version}/download", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert f'filename="{repo}-{version}.tar.gz"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == [
            f"{repo}-{version}/adapter_config.json",
            f"{repo}-{version}/adapter_model.safetensors",
        ]
        archive.extractall(dest, filter="data")
    return dest / f"{repo}-{version}"


# ---- import, serve, export -----------------------------------------------------------------------------


def test_import_as_files_and_archives_serves_like_transformers_peft(
    client: TestClient, alice: dict[str, str], platform: Platform, lora_dir: Path, reference: dict[str, str]
) -> None:
    assert reference["adapter"] != reference["base"]  # a wrongly applied (or missing) adapter would be caught
    with_readme = peft_files(lora_dir, "adapter_config.json", "adapter_model.safetensors", "README.md")

    r = import_files(client, alice, "imported", with_readme)
    assert r.status_code == 201, r.text
    first = r.json()
    assert (first["name"], first["version"], first["base_model"], first["adapter_type"]) == (
        "imported/1",
        1,
        TINY_MODEL,
        "lora",
    )
    assert first["rank"] == 4 and first["job_id"] is None
    assert first["target_modules"] == ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # the model's order

    # The archives: a .tar.gz of the folder (as `tar czf a.tgz adapter/` makes it) and a .zip of the files.
    r = import_archive(client, alice, "imported", tar_gz(with_readme, folder="adapter"))
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "imported/2"
    r = import_archive(client, alice, "imported", zip_bytes(peft_files(lora_dir)), filename="adapter.zip")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "imported/3"

    repo = client.get("/v1/repos/imported", headers=alice).json()
    assert [v["name"] for v in repo["versions"]] == ["imported/1", "imported/2", "imported/3"]
    assert {"imported/1", "imported/2", "imported/3"} <= {
        m["id"] for m in client.get("/v1/models", headers=alice).json()["data"]
    }
    # Stored: exactly the two files serving needs, the weights byte for byte as uploaded.
    tenant_dir = next((platform.data_dir / "volume" / "adapters").iterdir())
    for version in ("1", "2", "3"):
        stored = tenant_dir / "imported" / version
        assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert (stored / "adapter_model.safetensors").read_bytes() == (
            lora_dir / "adapter_model.safetensors"
        ).read_bytes()
    assert [p.name for p in (tenant_dir / "imported").iterdir() if p.name.startswith(".")] == []  # no staging left

    for model in ("imported/1", "imported/2", "imported/3", "imported"):
        assert chat(client, alice, model) == reference["adapter"], model
    assert chat(client, alice, TINY_MODEL) == reference["base"]


def test_export_loads_unchanged_with_peft_and_imports_again(
    client: TestClient,
    alice: dict[str, str],
    platform: Platform,
    worker: InProcessWorker,
    lora_dir: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert import_files(client, alice, "imported", peft_files(lora_dir)).status_code == 201
    trained = train_version(client, alice)
    assert trained == "trained/1"

    tenant_dir = next((platform.data_dir / "volume" / "adapters").iterdir())
    for name in ("imported/1", trained):
        exported = download(client, alice, name, tmp_path / name.replace("/", "-"))
        stored = tenant_dir / name
        config_text = (exported / "adapter_config.json").read_text()
        assert str(platform.data_dir) not in config_text and "volume" not in config_text  # no server paths
        assert json.loads(config_text)["base_model_name_or_path"] == TINY_MODEL  # a local model: its catalog name
        exported_weights = (exported / "adapter_model.safetensors").read_bytes()
        assert exported_weights == (stored / "adapter_model.safetensors").read_bytes()

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, exported)  # the exported folder, unchanged
        loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        expected = load_file(stored / "adapter_model.safetensors")
        assert set(loaded) == set(expected) and expected, name
        for key, tensor in expected.items():
            assert torch.equal(loaded[key].detach(), tensor), key
        assert any(torch.count_nonzero(t) for k, t in expected.items() if "lora_B" in k)

        # What comes out goes back in: the exported archive imports as a new version.
        repo = name.split("/")[0]
        r = client.get(f"/v1/repos/{repo}/versions/{name.split('/')[1]}/download", headers=alice)
        again = import_archive(client, alice, repo, r.content)
        assert again.status_code == 201, again.text
        assert again.json()["name"] == f"{repo}/2"


def train_version(client: TestClient, headers: dict[str, str]) -> str:
    """A real (tiny) fine-tuning job, so the export of what training stores is covered too."""
    rows = [{"prompt": f"Say hi to {n}", "completion": f"Hi {n}!"} for n in ("Ann", "Bo", "Cy", "Di")]
    r = client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": ("hi.jsonl", "\n".join(json.dumps(row) for row in rows).encode())},
        data={"base_model": TINY_MODEL},
    )
    assert r.status_code == 201, r.text
    r = client.post(
        "/v1/finetuning/jobs",
        headers=headers,
        json={
            "base_model": TINY_MODEL,
            "dataset": "hi",
            "repo": "trained",
            "epochs": 1,
            "rank": 4,
            "learning_rate": 1e-3,
            "effective_batch_size": 2,
        },
    )
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/finetuning/jobs/{r.json()['id']}", headers=headers).json())["status"] in (
        "queued",
        "training",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "completed", job
    return job["adapter"]


@pytest.fixture
def vllm() -> Any:
    """Listed first by the test that needs it, so that a missing vLLM skips before any platform is built."""
    module = pytest.importorskip("vllm", reason="vLLM is not installed here; the vLLM loading check needs it and a GPU")
    if not torch.cuda.is_available():
        pytest.skip("vLLM is installed but no CUDA device is available to load the adapter on")
    return module


def test_vllm_loads_the_export(
    vllm: Any, sqlite_platform: Platform, lora_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from web.main import create_app

    headers = make_tenant("alice")[1]
    with TestClient(create_app()) as client:
        assert import_files(client, headers, "imported", peft_files(lora_dir)).status_code == 201
        exported = download(client, headers, "imported/1", tmp_path)
    llm = LLM(model=str(tiny_model_dir), enable_lora=True, max_lora_rank=8, max_model_len=512, enforce_eager=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with_adapter = llm.generate(
        ["The cat sat on the"], params, lora_request=LoRARequest("imported-1", 1, str(exported))
    )
    without = llm.generate(["The cat sat on the"], params)
    assert with_adapter[0].outputs[0].token_ids != without[0].outputs[0].token_ids  # the adapter was applied


# ---- refusals ------------------------------------------------------------------------------------------


def config_with(lora_dir: Path, **changes: Any) -> bytes:
    config = json.loads((lora_dir / "adapter_config.json").read_text()) | changes
    return json.dumps(config).encode()


def weights_renamed(lora_dir: Path, old: str, new: str) -> bytes:
    return save({k.replace(old, new): v for k, v in load_file(lora_dir / "adapter_model.safetensors").items()})


def symlink_tar(lora_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in peft_files(lora_dir):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("README.md")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


def poisoned_weights(lora_dir: Path, value: float) -> bytes:
    """The adapter's weights with one value of one lora_A replaced (NaN or an infinity)."""
    tensors = load_file(lora_dir / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_A" in k)[-1]
    tensors[key][0, 0] = value
    return save(tensors)


def pickled_weights(lora_dir: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(load_file(lora_dir / "adapter_model.safetensors"), buffer)
    return buffer.getvalue()


Send = Callable[[TestClient, dict[str, str]], httpx.Response]


def refusals(lora_dir: Path, foreign_lora_dir: Path, rank32_lora_dir: Path) -> list[tuple[str, Send, int, str, str]]:
    """(what, request, status, param, a fragment of the message)."""
    config, weights = peft_files(lora_dir)

    def files(repo: str, members: Files, base_model: str = TINY_MODEL) -> Send:
        return lambda c, h: import_files(c, h, repo, members, base_model)

    def archive(repo: str, data: bytes, filename: str = "adapter.tar.gz") -> Send:
        return lambda c, h: import_archive(c, h, repo, data, filename)

    def cfg(**changes: Any) -> Files:
        return [("adapter_config.json", config_with(lora_dir, **changes)), weights]

    return [
        ("no adapter_config.json", files("fresh", [weights]), 422, "adapter_config.json", "missing"),
        ("no weights", files("fresh", [config]), 422, "adapter_model.safetensors", "missing"),
        (
            "pickled .bin weights",
            files("fresh", [config, ("adapter_model.bin", pickled_weights(lora_dir))]),
            422,
            "adapter_model.bin",
            "arbitrary code",
        ),
        (  # DoRA is served, but needs its magnitude vectors
            "DoRA without magnitudes",
            files("imported", cfg(use_dora=True)),
            422,
            "adapter_model.safetensors",
            "DoRA magnitude",
        ),
        ("AdaLoRA", files("imported", cfg(peft_type="ADALORA")), 422, "adapter_config.json", "LoRA adapters only"),
        ("IA3", files("imported", cfg(peft_type="IA3")), 422, "adapter_config.json", "'IA3'"),
        (
            "target module the model lacks",
            files("imported", cfg(target_modules=["q_proj", "attn_proj"])),
            422,
            "adapter_config.json",
            "'attn_proj'",
        ),
        (
            "tensor of a module outside target_modules",
            files("imported", cfg(target_modules=["q_proj"])),
            422,
            "adapter_model.safetensors",
            "not among target_modules",
        ),
        (
            "made for hidden size 32",
            files("imported", peft_files(foreign_lora_dir)),
            422,
            "adapter_model.safetensors",
            "was the adapter made for another model",
        ),
        (
            "rank in the config differs from the tensors",
            files("imported", cfg(r=8)),
            422,
            "adapter_model.safetensors",
            "for rank 8",
        ),
        (
            "layer 5 of a 2-layer model",
            files(
                "imported", [config, ("adapter_model.safetensors", weights_renamed(lora_dir, "layers.1.", "layers.5."))]
            ),
            422,
            "adapter_model.safetensors",
            "layer 5 does not exist",
        ),
        ("unknown base model", files("fresh", peft_files(lora_dir), "gpt-17"), 422, "base_model", "'gpt-17'"),
        (
            "'../evil' in the archive",
            archive("fresh", tar_gz([*peft_files(lora_dir), ("../evil", b"owned")])),
            422,
            "archive",
            "outside the archive",
        ),
        (
            "absolute path in a zip",
            archive("fresh", zip_bytes([*peft_files(lora_dir), ("/tmp/evil", b"owned")]), "adapter.zip"),
            422,
            "archive",
            "outside the archive",
        ),
        ("symlink in the archive", archive("fresh", symlink_tar(lora_dir)), 422, "archive", "link"),
        ("not an archive", archive("fresh", b"just some text"), 422, "archive", ".zip or .tar.gz"),
        (
            "both files and an archive",
            lambda c, h: c.post(
                "/v1/repos/fresh/versions",
                headers=h,
                files=[("files", ("adapter_config.json", config[1])), ("archive", ("a.tar.gz", tar_gz([config])))],
                data={"base_model": TINY_MODEL},
            ),
            422,
            "archive",
            "either",
        ),
        ("bad repo name", files("bad repo!", peft_files(lora_dir)), 422, "repo", "letters, digits"),
        # Adapters the engines cannot serve, or that would poison a batch: refused at the door.
        ("rank 32", files("imported", peft_files(rank32_lora_dir)), 422, "adapter_config.json", "from 1 to 16"),
        ("rank 0", files("imported", cfg(r=0)), 422, "adapter_config.json", "r: the rank must be"),
        ("rank as a float", files("imported", cfg(r=4.0)), 422, "adapter_config.json", "r: expected an integer"),
        ("huge alpha", files("imported", cfg(lora_alpha=1e30)), 422, "adapter_config.json", "lora_alpha: must be"),
        ("NaN alpha", files("imported", cfg(lora_alpha=float("nan"))), 422, "adapter_config.json", "got nan"),
        ("infinite alpha", files("imported", cfg(lora_alpha=float("inf"))), 422, "adapter_config.json", "got inf"),
        ("alpha as text", files("imported", cfg(lora_alpha="8")), 422, "adapter_config.json", "lora_alpha: expected"),
        ("dropout 5", files("imported", cfg(lora_dropout=5)), 422, "adapter_config.json", "lora_dropout: must be"),
        ("dropout 1", files("imported", cfg(lora_dropout=1.0)), 422, "adapter_config.json", "below 1"),
        ("negative dropout", files("imported", cfg(lora_dropout=-0.1)), 422, "adapter_config.json", "at least 0"),
        ("use_rslora 'yes'", files("imported", cfg(use_rslora="yes")), 422, "adapter_config.json", "a boolean"),
        ("use_dora 1", files("imported", cfg(use_dora=1)), 422, "adapter_config.json", "use_dora: expected a boolean"),
        (
            "inference_mode 'false'",
            files("imported", cfg(inference_mode="false")),
            422,
            "adapter_config.json",
            "'false'",
        ),
        (
            "layers_to_transform text",
            files("imported", cfg(layers_to_transform="0")),
            422,
            "adapter_config.json",
            "a list",
        ),
        (
            "unknown key",
            files("imported", cfg(lora_scale=100)),
            422,
            "adapter_config.json",
            "lora_scale: not a LoraConfig",
        ),
        (
            "NaN in a weight",
            files("imported", [config, ("adapter_model.safetensors", poisoned_weights(lora_dir, float("nan")))]),
            422,
            "adapter_model.safetensors",
            "NaN or infinite",
        ),
        (
            "infinity in a weight",
            files("imported", [config, ("adapter_model.safetensors", poisoned_weights(lora_dir, float("-inf")))]),
            422,
            "adapter_model.safetensors",
            "NaN or infinite",
        ),
    ]


def test_refusals_name_the_fault_and_leave_nothing(
    client: TestClient,
    alice: dict[str, str],
    platform: Platform,
    lora_dir: Path,
    foreign_lora_dir: Path,
    rank32_lora_dir: Path,
) -> None:
    # One good version first, so "nothing new" is measured against a volume and tables that hold something.
    assert import_files(client, alice, "imported", peft_files(lora_dir)).status_code == 201
    volume_before, rows_before = adapters_on_volume(platform), row_counts()
    assert rows_before == (1, 1) and volume_before

    for what, send, status, param, fragment in refusals(lora_dir, foreign_lora_dir, rank32_lora_dir):
        r = send(client, alice)
        assert r.status_code == status, (what, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (what, error)
        assert error["type"] == "invalid_request_error", (what, error)
        assert fragment in error["message"], (what, error)
        assert adapters_on_volume(platform) == volume_before, what
        assert row_counts() == rows_before, what
    assert [r["name"] for r in client.get("/v1/repos", headers=alice).json()] == ["imported"]


def test_unpacked_size_is_capped(
    client: TestClient, alice: dict[str, str], platform: Platform, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small archive that unpacks to more than LORAPLEX_MAX_UPLOAD_BYTES (a zip bomb) is cut off: 413."""
    from app.settings import get_settings

    limit = 256 * 1024
    monkeypatch.setattr(get_settings().limits, "max_upload_bytes", limit)
    bomb = [*peft_files(lora_dir), ("padding.txt", bytes(4 * limit))]
    for data, filename in ((zip_bytes(bomb), "a.zip"), (tar_gz(bomb), "a.tar.gz")):
        assert len(data) < limit  # the upload itself is small
        r = import_archive(client, alice, "bomb", data, filename)
        assert r.status_code == 413, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("archive", "file_too_large")
    # Plain files just over the limit (a request far over it is refused by its Content-Length before this).
    files = peft_files(lora_dir)
    files.append(("padding.txt", bytes(limit + 1 - sum(len(data) for _, data in files))))
    r = import_files(client, alice, "bomb", files)
    assert r.status_code == 413 and r.json()["error"]["param"] == "files", r.text
    assert adapters_on_volume(platform) == [] and row_counts() == (0, 0)


def test_another_tenants_version_downloads_as_missing(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], lora_dir: Path
) -> None:
    assert import_files(client, alice, "imported", peft_files(lora_dir)).status_code == 201
    assert client.get("/v1/repos/imported/versions/1/download", headers=alice).status_code == 200
    theirs = client.get("/v1/repos/imported/versions/1/download", headers=bob)
    missing = client.get("/v1/repos/imported/versions/2/download", headers=alice)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == {
        "error": {
            "message": "adapter imported/1 not found",
            "type": "not_found_error",
            "param": "version",
            "code": "adapter_not_found",
        }
    }
    assert missing.json()["error"] | {"message": ""} == theirs.json()["error"] | {"message": ""}
    # Bob's own repo of the same name is his alone.
    assert import_files(client, bob, "imported", peft_files(lora_dir)).json()["name"] == "imported/1"
    assert [v["name"] for v in client.get("/v1/repos/imported", headers=alice).json()["versions"]] == ["imported/1"]


def test_concurrent_publishers_get_distinct_versions_and_keep_their_files(platform: Platform, tmp_path: Path) -> None:
    """Two publishers that read the same latest version: one commits N, the other waits on the unique index,
    retries and takes N+1, and neither touches the other's directory."""
    import threading

    from functions.repos import publish_adapter

    tenant_id = make_tenant("alice")[0]
    barrier = threading.Barrier(2, timeout=30)
    first_call: set[str] = set()
    results: dict[str, int] = {}
    errors: list[BaseException] = []
    calls: list[str] = []

    def publish(who: str) -> None:
        files = tmp_path / who
        files.mkdir()
        (files / "marker.txt").write_text(who)

        def guard(_: Any) -> bool:
            calls.append(who)
            if who not in first_call:  # both inside their first transaction before either allocates a number
                first_call.add(who)
                barrier.wait()
            return True

        try:
            published = publish_adapter(
                tenant_id,
                "race",
                files,
                base_model=TINY_MODEL,
                adapter_type="lora",
                rank=4,
                target_modules=["q_proj"],
                guard=guard,
            )
            assert published is not None
            results[who] = published.version
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(results.values()) == [1, 2]
    # Both were inside their first transaction together (the barrier). The loser either waited on the repo row's
    # lock and then took the next number (2 calls), or failed on the unique index and was retried (3 calls):
    # which one depends on the database's locking and on timing.
    assert len(calls) in (2, 3)
    race = platform.data_dir / "volume" / "adapters" / tenant_id / "race"
    assert sorted(p.name for p in race.iterdir()) == ["1", "2"]  # no staging folder left either
    for who, version in results.items():
        assert (race / str(version) / "marker.txt").read_text() == who
    assert row_counts() == (1, 2)


def test_a_dora_adapter_imports_and_serves_like_peft(
    client: TestClient, alice: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dora = build_lora(base, tmp_path / "dora", use_dora=True)
    r = import_files(client, alice, "dora", peft_files(dora))
    assert r.status_code == 201, r.text
    assert chat(client, alice, "dora/1") == greedy_reference(tiny_model_dir, dora)


def test_every_key_peft_writes_imports_with_its_types(
    client: TestClient, alice: dict[str, str], lora_dir: Path
) -> None:
    """The known keys come from the installed PEFT: whatever its LoraConfig writes (every field, at its default, as
    save_pretrained does; runtime_config too) imports, and so do in-range values of the checked fields, a float
    alpha included."""
    from peft import LoraConfig

    written = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS)
    config = json.loads(json.dumps(written.to_dict(), default=list))  # as PEFT saves it: sets as lists
    config |= {"runtime_config": {"ephemeral_gpu_offload": False}}
    named_in_the_issue = [
        "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
        "fan_in_fan_out", "bias", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
        "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "use_dora",
        "layer_replication", "runtime_config", "lora_bias", "exclude_modules", "eva_config", "corda_config",
        "target_parameters", "trainable_token_indices", "qalora_group_size", "use_qalora", "alora_invocation_tokens",
        "arrow_config", "ensure_weight_tying",
    ]  # fmt: skip
    assert set(named_in_the_issue) <= set(config)
    weights = ("adapter_model.safetensors", (lora_dir / "adapter_model.safetensors").read_bytes())
    for changes in (
        {},
        {"lora_alpha": 16.0, "lora_dropout": 0.5, "use_rslora": True, "init_lora_weights": "gaussian"},
        {"r": 4, "lora_alpha": 4096, "lora_dropout": 0, "layers_to_transform": [0, 1], "inference_mode": True},
    ):
        files = [("adapter_config.json", json.dumps(config | changes).encode()), weights]
        r = import_files(client, alice, "peft", files)
        assert r.status_code == 201, (changes, r.text)


def test_a_repo_is_created_empty_with_its_description(client: TestClient, platform: Platform) -> None:
    """POST /v1/repos: an empty repo with its description, which the next import fills; a taken or bad name, or an
    unknown field, is refused naming it with nothing created; another tenant sees nothing of it."""
    _, alice = make_tenant("alice")
    _, bob = make_tenant("bob")
    r = client.post("/v1/repos", headers=alice, json={"name": "greet", "description": "greeters"})
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["description"], r.json()["versions"]) == ("greet", "greeters", [])
    for body, status, param in (
        ({"name": "greet"}, 409, "name"),
        ({"name": "-bad"}, 422, "name"),
        ({"name": "other", "labels": ["x"]}, 422, "labels"),
        ({"name": "other", "description": "x" * 2001}, 422, "description"),
    ):
        refused = client.post("/v1/repos", headers=alice, json=body)
        assert (refused.status_code, refused.json()["error"]["param"]) == (status, param), refused.text
    assert [repo["name"] for repo in client.get("/v1/repos", headers=alice).json()] == ["greet"]
    assert client.get("/v1/repos", headers=bob).json() == []
    assert client.get("/v1/repos/greet", headers=bob).status_code == 404
    assert client.post("/v1/repos", headers=bob, json={"name": "greet"}).status_code == 201  # names are per tenant

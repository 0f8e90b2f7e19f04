"""The GGUF header reader: a whole file passes, a cut or foreign one is one ModelError line naming it."""

import re
import struct
from pathlib import Path

import fsspec
import gguf
import pytest

from runner.errors import ModelError
from runner.spec.gguf import check_gguf
from runner.tinymodel import TinyConfig, write_tiny_gguf

KEY = "workers[0].model"


@pytest.fixture(scope="module", params=["Q8_0", "BF16", "F32"])
def model(request, tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", TinyConfig(quant=request.param))


def cut(model: str, path, at: int) -> str:
    path.write_bytes(Path(model).read_bytes()[:at])
    return str(path)


def test_a_whole_tiny_gguf_passes_and_its_tensors_match_gguf_py(model):
    header = check_gguf(model, {}, KEY)
    reader = gguf.GGUFReader(model)  # llama.cpp's own Python reader, which maps the whole file
    assert header.alignment == 32 and header.data_start % 32 == 0
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=False):
        assert header.data_start + ours.offset == theirs.data_offset
        assert ours.ggml_type == int(theirs.tensor_type)


def test_general_alignment_is_honoured(tmp_path):
    path = str(tmp_path / "aligned.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(256)
    w.add_token_list(["a", "bb", "ccc"])
    w.add_tensor("t", gguf.np.ones(64, dtype=gguf.np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = check_gguf(path, {}, KEY)
    assert header.alignment == 256 and header.data_start % 256 == 0
    assert header.data_start == gguf.GGUFReader(path).tensors[0].data_offset


def _after_header(model, h):
    return 24  # magic, version, tensor count, key-value count


def _in_tensor_infos(model, h):
    return Path(model).read_bytes().index(b"token_embd.weight") + 5


def _in_tensor_data(model, h):
    return (h.data_start + h.file_size) // 2


@pytest.mark.parametrize("where, at, message", [
    ("after the header", _after_header, "ends inside its header (in its key-value metadata, after 24 bytes"),
    ("in the tensor infos", _in_tensor_infos, "ends inside its header (in its tensor infos"),
    ("in the tensor data", _in_tensor_data, "is cut short: tensor "),
])
def test_a_cut_gguf_is_one_line_naming_the_file(model, tmp_path, where, at, message):
    path = cut(model, tmp_path / "cut.gguf", at(model, check_gguf(model, {}, KEY)))
    with pytest.raises(ModelError) as e:
        check_gguf(path, {}, KEY)
    text = str(e.value)
    assert text.startswith(f"{KEY}: {path} {message}") and "\n" not in text, text
    assert text.endswith("an incomplete download?)")


def test_a_cut_in_the_data_names_the_first_tensor_that_does_not_fit(tmp_path):
    model = write_tiny_gguf(tmp_path / "m.gguf")
    h = check_gguf(model, {}, KEY)
    last = h.tensors[-1]
    path = cut(model, tmp_path / "cut.gguf", h.data_start + last.offset + 1)
    with pytest.raises(ModelError, match=rf"tensor {last.name} needs bytes up to \d+ but the file has "
                                         rf"{h.data_start + last.offset + 1} "):
        check_gguf(path, {}, KEY)


def test_llama_cpp_refuses_the_cut_file_too(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = write_tiny_gguf(tmp_path / "m.gguf")
    h = check_gguf(model, {}, KEY)
    path = cut(model, tmp_path / "cut.gguf", h.file_size - 4096)
    with pytest.raises(ModelError, match="is cut short"):
        check_gguf(path, {}, KEY)
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=path, verbose=False)


def test_an_unknown_ggml_type_is_checked_only_for_its_offset(tmp_path):
    model = write_tiny_gguf(tmp_path / "m.gguf")
    h = check_gguf(model, {}, KEY)
    data = bytearray(Path(model).read_bytes())
    last = h.tensors[-1]  # its info: name, n_dims, dims, type (u32), offset (u64)
    name = struct.pack("<Q", len(last.name)) + last.name.encode()
    type_at = data.index(name) + len(name) + 4 + 8 * len(last.dims)
    data[type_at:type_at + 4] = struct.pack("<I", 999)
    start = h.data_start + last.offset
    (tmp_path / "odd.gguf").write_bytes(bytes(data[:start + 1]))
    check_gguf(str(tmp_path / "odd.gguf"), {}, KEY)  # its size is unknown, its start is inside the file
    data[type_at + 4:type_at + 12] = struct.pack("<Q", h.file_size)  # now it starts past the end
    (tmp_path / "odd.gguf").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=rf"tensor {last.name} starts at byte {h.data_start + h.file_size} but the "
                                         rf"file has {h.file_size} "):
        check_gguf(str(tmp_path / "odd.gguf"), {}, KEY)


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 a zip archive", "is not a GGUF file (magic b'PK\\x03\\x04')"),
    (b"", "is empty (an incomplete download?)"),
    (b"GGUF\x01\x00\x00\x00" + bytes(16), "is GGUF version 1; llama.cpp reads versions 2 and 3"),
])
def test_a_file_that_is_not_a_loadable_gguf_is_refused(tmp_path, content, message):
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError) as e:
        check_gguf(str(path), {}, KEY)
    assert str(e.value) == f"{KEY}: {path} {message}"


def test_a_missing_model_and_a_url_are_read_through_fsspec(tmp_path):
    with pytest.raises(ModelError, match=rf"^{re.escape(KEY)}: {tmp_path}/nowhere.gguf does not exist$"):
        check_gguf(str(tmp_path / "nowhere.gguf"), {}, KEY)
    model = write_tiny_gguf(tmp_path / "m.gguf")
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/models/whole.gguf", Path(model).read_bytes())
    fs.pipe_file("/models/cut.gguf", Path(model).read_bytes()[:100_000])
    try:
        assert len(check_gguf("memory://models/whole.gguf", {}, KEY).tensors) == 21
        with pytest.raises(ModelError, match=rf"^{re.escape(KEY)}: memory://models/cut.gguf is cut short: tensor "):
            check_gguf("memory://models/cut.gguf", {}, KEY)
    finally:
        fs.rm("/models", recursive=True)

import pytest

from runner.errors import InputError
from runner.plan import InputFile, cut_units, make_plan
from runner.spec import parse_spec

from conftest import write_shard


def spec_for(path, **inp):
    raw = {"name": "j", "input": {"path": str(path), **inp}, "output": {"path": "/tmp/o"},
           "workers": [{"engine": "echo"}], "unit_rows": 100}
    return parse_spec(raw, {})[0]


def test_units_align_to_row_groups_and_split_large_ones():
    f = InputFile("f", 390, (40, 40, 40, 250, 20))
    units = cut_units(3, f, 100)
    assert [(u.row_start, u.num_rows, u.row_groups, u.skip) for u in units] == [
        (0, 80, (0, 1), 0), (80, 40, (2,), 0), (120, 100, (3,), 0), (220, 100, (3,), 100),
        (320, 50, (3,), 200), (370, 20, (4,), 0)]
    assert units[0].id == "part-00003-0000000000"
    assert sum(u.num_rows for u in units) == 390


def test_directory_is_listed_sorted_and_hidden_files_skipped(tmp_path):
    for name in ["b.parquet", "a.parquet", "_tmp.parquet"]:
        write_shard(tmp_path / name, ["x"] * 3)
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "c.parquet", ["y"])
    plan = make_plan(spec_for(tmp_path))
    assert [f.url.rsplit("/", 2)[-1] for f in plan.files] == ["a.parquet", "b.parquet", "c.parquet"]
    assert plan.total_rows == 7


def test_glob_and_empty_file(tmp_path):
    write_shard(tmp_path / "a.parquet", ["x"] * 3)
    write_shard(tmp_path / "b.parquet", [])
    plan = make_plan(spec_for(tmp_path / "*.parquet"))
    assert len(plan.files) == 2 and len(plan.units) == 1


@pytest.mark.parametrize("setup, inp, message", [
    (None, {}, "does not exist"),
    (lambda d: (d / "x.txt").write_text("hi"), {}, "no *.parquet files under"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"prompt_column": "text"}, "column 'text' (input.prompt_column) not found"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"columns": ["nope"]}, "column 'nope' (input.columns[0]) not found"),
    (lambda d: write_shard(d / "a.parquet", ["x"]), {"prompt_column": "id"}, "has type int64, expected string"),
    (lambda d: (d / "a.parquet").write_bytes(b"garbage"), {}, "not a readable Parquet file"),
])
def test_input_errors_name_the_culprit(tmp_path, setup, inp, message):
    d = tmp_path / "in"
    if setup is not None:
        d.mkdir()
        setup(d)
    with pytest.raises(InputError) as e:
        make_plan(spec_for(d, **inp))
    assert message in str(e.value)


def test_copied_column_type_must_agree_across_shards(tmp_path):
    write_shard(tmp_path / "a.parquet", ["x"], category=["c"])
    write_shard(tmp_path / "b.parquet", ["y"], category=[3])
    with pytest.raises(InputError, match=r"b.parquet: column 'category' has type int64 but .*a.parquet has string"):
        make_plan(spec_for(tmp_path, columns=["category"]))

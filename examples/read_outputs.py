"""Read a job's outputs the way a downstream pipeline would: `python examples/read_outputs.py OUTPUT_DIR`."""

import sys

import pyarrow.compute as pc
import pyarrow.dataset as ds

out = sys.argv[1] if len(sys.argv) > 1 else "out/quickstart"
table = ds.dataset(out, format="parquet").to_table()
print(f"{table.num_rows} rows, columns: {table.column_names}")
print(f"failed rows: {pc.sum(pc.is_valid(table['error'])).as_py() or 0}")
for row in table.sort_by([("source_file", "ascending"), ("source_row", "ascending")]).slice(0, 3).to_pylist():
    print(f"  {row['id']} [{row['finish_reason']}, {row['completion_tokens']} tokens]: {row['text']!r:.80}")

"""A data pipeline around runner's Python API: raw reviews -> prompts (DuckDB) -> runner.submit (llama.cpp)
-> outputs joined back to the reviews (DuckDB) -> one Parquet table; then the same submit again (it resumes
and runs nothing) and the outputs read with Ray Data and polars.

    python examples/pipeline.py --workdir /tmp/reviews --model models/tiny.gguf [--rows 1000]

Each step is what a task in an Airflow, Dagster or Prefect DAG would run. The model defaults to the tiny
random-weight GGUF (written when missing), so the generated text is noise; the plumbing is the point.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

import runner

PRODUCTS = ["kettle", "headphones", "desk lamp", "backpack", "blender", "phone case", "monitor", "sneakers"]
OPINIONS = {1: "broke after a week", 2: "feels cheap", 3: "does the job", 4: "works well", 5: "is excellent"}
DETAILS = ["shipping was fast", "the box was damaged", "support answered quickly", "the price was fair",
           "the manual is unclear", "it looks nicer than the photos"]
SHARDS = 4


def write_reviews(path: str, rows: int, seed: int = 0) -> None:
    """Raw data as an upstream system would land it: one Parquet file of reviews."""
    rng = random.Random(seed)
    stars = [rng.randint(1, 5) for _ in range(rows)]
    products = [rng.choice(PRODUCTS) for _ in range(rows)]
    text = [f"The {p} {OPINIONS[s]}, and {rng.choice(DETAILS)}." for p, s in zip(products, stars, strict=False)]
    pq.write_table(pa.table({"review_id": pa.array(range(rows), pa.int64()), "product": products,
                             "stars": pa.array(stars, pa.int8()), "text": text}), path)


def write_prompts(reviews: str, prompts_dir: str) -> None:
    """Prompts built in SQL over the raw file, written as SHARDS Parquet shards (the runner's input)."""
    os.makedirs(prompts_dir, exist_ok=True)
    for shard in range(SHARDS):
        duckdb.sql(f"""
            COPY (
                SELECT review_id,
                       'Summarize this ' || stars || '-star review of a ' || product || ' in one line: ' || text
                           AS prompt
                FROM read_parquet('{reviews}') WHERE review_id % {SHARDS} = {shard} ORDER BY review_id
            ) TO '{prompts_dir}/prompts-{shard:05d}.parquet' (FORMAT parquet, ROW_GROUP_SIZE 100)""")


def summarize_job(prompts_dir: str, out_dir: str, model: str) -> dict:
    """The job, as the dict a DAG would build; the keys are job.yaml's."""
    return {
        "name": "review-summaries",
        "input": {"path": prompts_dir, "prompt_column": "prompt", "id_column": "review_id"},
        "output": {"path": out_dir},
        "sampling": {"max_tokens": 16, "temperature": 0.0, "seed": 0},
        "workers": [{"engine": "llamacpp", "model": model, "replicas": 1, "num_cpus": 1, "n_ctx": 512,
                     "parallel": 8}],
        "unit_rows": 100,
    }


def join_outputs(reviews: str, outputs, final: str) -> int:
    """Each review with its generated summary, joined by id; `outputs` is runner.read's Dataset (only
    committed rows), which DuckDB scans directly. Returns the rows written."""
    con = duckdb.connect()
    con.register("outputs", outputs)
    con.execute(f"""
        COPY (
            SELECT r.*, o.text AS summary, o.finish_reason, o.completion_tokens, o.error
            FROM read_parquet('{reviews}') r LEFT JOIN outputs o USING (review_id)
            ORDER BY r.review_id
        ) TO '{final}' (FORMAT parquet)""")
    return con.execute(f"SELECT count(*) FROM read_parquet('{final}')").fetchone()[0]


def downstream(outputs, final: str) -> None:
    """Two readers a downstream team might use: Ray Data on the committed parts, polars on the final table."""
    import polars as pl
    import ray
    from ray.data.aggregate import Count, Sum

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator progress lines
    ds = ray.data.read_parquet(outputs.files, filesystem=outputs.filesystem)
    totals = ds.aggregate(Count(), Sum("completion_tokens"))
    print(f"ray data: {totals['count()']} output rows, {totals['sum(completion_tokens)']} generated tokens")
    by_stars = (pl.read_parquet(final).group_by("stars")
                .agg(pl.len().alias("reviews"), pl.col("summary").str.len_chars().mean().alias("summary_chars"))
                .sort("stars"))
    print(f"polars: summaries by stars\n{by_stars}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="Where the raw data, prompts, outputs and final table go.")
    ap.add_argument("--model", default="models/tiny.gguf", help="A GGUF; the tiny model is written when missing.")
    ap.add_argument("--rows", type=int, default=1000, help="Raw reviews to generate.")
    a = ap.parse_args()
    work = os.path.abspath(a.workdir)
    reviews, prompts, out, final = (os.path.join(work, n) for n in
                                    ("reviews.parquet", "prompts", "out", "reviews_with_summaries.parquet"))
    if not os.path.exists(a.model):
        from runner.tinymodel import write_tiny_model

        print(f"model: {write_tiny_model(a.model)} (tiny, random weights)")
    # The raw data and prompts are written once: a rerun over the same workdir resumes the same job, where
    # new input files would be refused as a change of input.
    if not os.path.exists(prompts):
        os.makedirs(work, exist_ok=True)
        write_reviews(reviews, a.rows)
        write_prompts(reviews, prompts)

    import ray

    # One Ray for the whole pipeline: runner.submit and Ray Data both use the Ray this process started.
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="WARNING")
    try:
        job = summarize_job(prompts, out, os.path.abspath(a.model))
        m = runner.submit(job)
        print(f"first submit: {m.rows_ok} rows ok, {m.rows_failed} failed, {m.units_this_run} units run, "
              f"{m.units_skipped} skipped, {m.wall_time_s:.1f}s, {m.tokens_per_s:.0f} tok/s")
        outputs = runner.read(job)
        print(f"joined: {join_outputs(reviews, outputs, final)} reviews with summaries -> {final}")
        again = runner.submit(job)
        print(f"second submit: {again.units_skipped} units skipped, {again.units_this_run} run")
        downstream(outputs, final)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

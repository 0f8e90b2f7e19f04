"""The bookkeeping files runner keeps beside a job's outputs, each named once here. Every name starts with `_`,
which readers of a Parquet dataset (pyarrow, DuckDB, pandas, Spark) skip."""

JOB = "_job.json"  # the resolved spec and the plan's identity, written when the job first runs
LOCK = "_lock.json"  # the driver that holds the job now
COMMITS = "_commits"  # one marker per committed unit: the commit point
LEDGER = "_ledger.arrow"  # the markers rolled up, so a resume lists only what came since
MANIFEST = "_manifest.json"  # the finished job's counts
SUCCESS = "_SUCCESS"  # written last, when every unit is committed
REPORT = "_report.html"  # the job's timeline and figures
INDEXES = "_inputs"  # JSONL input files' line indexes, so a resume reads no input file again

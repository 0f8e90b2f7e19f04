"""The bookkeeping files runner keeps beside a job's outputs, each named once here. Every name starts with `_`,
which readers of a Parquet dataset (pyarrow, DuckDB, pandas, Spark) skip."""

JOB = "_job.json"  # the resolved spec and the plan's identity, written when the job first runs
LOCK = "_lock.json"  # the driver that holds the job now
COMMITS = "_commits"  # one marker per committed unit, until the ledger folds it in: the commit point
LEDGER = "_ledger"  # segments (Arrow IPC) of committed units' stats, whose markers were folded in and removed
STAGED = "_parts"  # committed units' rows waiting for an output file of output.target_file_mb (`<unit>.part`)
FILES = "_files"  # an output file being written and the units it holds, so a crash mid-write is finished
MANIFEST = "_manifest.json"  # the finished job's counts
SUCCESS = "_SUCCESS"  # written last, when every unit is committed
REPORT = "_report.html"  # the job's timeline and figures
INDEXES = "_inputs"  # JSONL input files' line indexes, so a resume reads no input file again

"""runner: distributed batch inference over Parquet shards."""

__version__ = "0.1.0"

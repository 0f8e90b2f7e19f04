"""Write sample prompt shards: `python examples/make_prompts.py DIR --rows N --shards K [--chat]`.

With --chat the shards hold a `messages` column (a system prompt shared by every row, then the
user's turn) and a `sampling` column of per-row overrides, for jobs/chat.yaml.
"""

import argparse
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["price", "quality", "service", "delivery", "battery", "screen", "sound", "size"]
TEMPLATES = [
    "Write a short summary of this review: the {t} was {a} and I would {v} buy it again.",
    "Answer the question: is the {t} of this product {a}?",
    "Describe the {t} in one sentence for a user who found it {a}.",
    "List three words about the {t} of a product that is {a}.",
]

SYSTEM = ("You are a support assistant for an online shop. Read the customer's message, keep to the facts "
          "in it, answer in one or two plain sentences, and never invent order numbers or prices.")
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
OVERRIDES = pa.struct([("max_tokens", pa.int64()), ("temperature", pa.float64())])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="write chat rows and per-row sampling overrides")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    os.makedirs(a.dir, exist_ok=True)
    per = -(-a.rows // a.shards)
    for s in range(a.shards):
        ids = list(range(s * per, min(a.rows, (s + 1) * per)))
        prompts = [
            rng.choice(TEMPLATES).format(t=rng.choice(TOPICS), a=rng.choice(["good", "bad", "great"]),
                                         v=rng.choice(["not", "surely"]))
            for _ in ids
        ]
        table = pa.table({"id": pa.array(ids, pa.int64()), "prompt": prompts,
                          "category": [TOPICS[i % len(TOPICS)] for i in ids]})
        if a.chat:
            chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in prompts]
            overrides = [{"max_tokens": 8, "temperature": 0.8} if i % 5 == 0 else None for i in ids]
            table = table.drop(["prompt"]).append_column("messages", pa.array(chats, MESSAGES)) \
                .append_column("sampling", pa.array(overrides, OVERRIDES))
        pq.write_table(table, os.path.join(a.dir, f"prompts-{s:05d}.parquet"), row_group_size=250)
    print(f"{a.rows} prompts in {a.shards} shards under {a.dir}")


if __name__ == "__main__":
    main()

"""Records for the seeds' profile / history SFT ablation (seed 003), generated offline.

    python examples/profile_history/make_data.py --out runs/data/profile_history.jsonl
    stagewise sweep configs/sft_profile_history.yaml

Each record has ``profile`` (name, diet), ``history`` (what the user said earlier), ``query`` and
``response``. The right response needs both: the diet in the profile picks a row of MENU, the
cuisine the user asked for earlier (in the history, among unrelated remarks) picks the column.
So the prompt-field ablations should order as: query_only (chance, 1 in 9) < profile or history
(1 in 3 at best) < profile_and_history (the dish can be known).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MENU = {
    "vegan": {"italian": "tomato risotto", "indian": "chana masala", "mexican": "bean tacos"},
    "vegetarian": {"italian": "margherita pizza", "indian": "paneer tikka", "mexican": "cheese quesadilla"},
    "pescatarian": {"italian": "seafood linguine", "indian": "fish curry", "mexican": "shrimp tacos"},
}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jo", "Kemal", "Lena"]
CRAVINGS = ["I feel like {c} food tonight.", "I've been craving {c} food lately.", "Something {c} would be nice."]
CUISINE_WORD = {"italian": "Italian", "indian": "Indian", "mexican": "Mexican"}
SMALL_TALK = ["My train was late today.", "I bought new running shoes.", "The weather is lovely.",
              "Work was busy this week.", "I watched a good film yesterday."]
QUERIES = ["What should I cook for dinner?", "Suggest a dinner for me.", "Any idea for dinner?"]


def record(rng: random.Random) -> dict:
    diet, cuisine = rng.choice(sorted(MENU)), rng.choice(sorted(CUISINE_WORD))
    history = [rng.choice(SMALL_TALK), rng.choice(CRAVINGS).format(c=CUISINE_WORD[cuisine])]
    rng.shuffle(history)
    return {"profile": {"name": rng.choice(NAMES), "diet": diet}, "history": history,
            "query": rng.choice(QUERIES), "response": MENU[diet][cuisine]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/data/profile_history.jsonl")
    ap.add_argument("--n", type=int, default=480)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(a.n)))
    print(f"wrote {a.n} records to {out}")


if __name__ == "__main__":
    main()

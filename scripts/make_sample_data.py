"""Write the small sample datasets kept in the repo (deterministic; re-run to regenerate).

The tasks are simple and regular (arithmetic, word reversal, case changes, chat about colours)
so that even a tiny random-init model shows a clear loss fall within a few dozen steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lamp garden window music paper orange silver forest candle "
    "rocket bridge pencil ocean castle mirror planet winter summer yellow purple basket dragon "
    "engine flower hammer island jacket kitten ladder marble needle parrot pillow rabbit saddle"
).split()
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "night": "dark", "cloud": "grey"}


def alpaca_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    """`n` distinct rows, then a handful of exact repeats so the duplicate metric has work."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        task = rng.choices(range(4), weights=[6, 2, 2, 0.1])[0]
        word = rng.choice(WORDS) + rng.choice(["", "s", "y"])
        if task == 0:
            a, b = rng.randrange(50), rng.randrange(50)
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}",
                         "output": str(a + b)})
        elif task == 1:
            rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        elif task == 2:
            rows.append({"instruction": "Write the word in capital letters.", "input": word,
                         "output": word.upper()})
        else:
            thing = rng.choice(sorted(COLOURS))
            rows.append({"instruction": f"What colour is the {thing}?", "input": "",
                         "output": f"The {thing} is {COLOURS[thing]}."})
        key = json.dumps(rows[-1], sort_keys=True)
        if key in seen:
            rows.pop()
        seen.add(key)
    return rows + rows[: max(1, n // 200)]


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "data" / "sample"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    rows = alpaca_rows(2000, rng)
    with open(out / "alpaca.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    chats = []
    for row in alpaca_rows(200, rng):
        prompt = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        chats.append({"messages": [
            {"role": "system", "content": "You are a precise assistant."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": row["output"]},
        ]})
    with open(out / "chat.jsonl", "w") as f:
        for chat in chats:
            f.write(json.dumps(chat) + "\n")
    print(f"wrote {len(rows)} alpaca rows and {len(chats)} chats to {out}")


if __name__ == "__main__":
    main()

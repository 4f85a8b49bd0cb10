"""Generate the embedded demo data set: several task families as prompt/response, a known fraction of
corrupted training responses, and a clean validation set.

    python infra/demo/make_demo_data.py --out infra/demo/data [--train 400] [--valid 60] [--corrupt 0.2]

Columns: prompt, response, family (the task), corruption ("" for a clean row, else how it was corrupted:
``swap`` = the response of another family's sample, ``copy`` = the input echoed back (easier to predict
than the right answer), ``wrong`` = a wrong answer of the right form). Seeded: the same arguments give
the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["river", "stone", "light", "garden", "winter", "market", "silver", "cloud", "forest", "candle", "ocean", "mirror", "paper", "window", "thunder", "meadow", "harbor", "lantern", "valley", "whisper", "orange", "castle", "bridge", "shadow"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
            "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens",
            "Poland": "Warsaw", "Chile": "Santiago", "Cuba": "Havana", "Ireland": "Dublin", "Portugal": "Lisbon",
            "Austria": "Vienna", "Sweden": "Stockholm", "Germany": "Berlin", "Russia": "Moscow", "China": "Beijing"}


def _reverse(rng: random.Random) -> tuple[str, str, str, str]:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    src = " ".join(ws)
    return f"Reverse the order of the words: {src} ->", " " + " ".join(reversed(ws)), src, \
        " " + " ".join(rng.sample(ws, len(ws)))


def _upper(rng: random.Random) -> tuple[str, str, str, str]:
    src = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    wrong = " ".join(w.capitalize() for w in src.split())
    return f"Write in capital letters: {src} ->", " " + src.upper(), src, " " + wrong


def _add(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(10, 89), rng.randint(10, 89)
    return f"Add the numbers: {a} + {b} =", f" {a + b}", f"{a} + {b}", f" {a + b + rng.choice([-10, -1, 1, 10])}"


def _capital(rng: random.Random) -> tuple[str, str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    wrong = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
    return f"What is the capital of {country}? Answer:", f" {CAPITALS[country]}", country, f" {wrong}"


FAMILIES = {"reverse": _reverse, "uppercase": _upper, "addition": _add, "capital": _capital}


def make_rows(n: int, rng: random.Random, corrupt: float) -> list[dict]:
    """``n`` rows, families round-robin, a seeded ``corrupt`` fraction corrupted in one of three ways."""
    rows = []
    for i in range(n):
        fam = list(FAMILIES)[i % len(FAMILIES)]
        prompt, response, src, wrong = FAMILIES[fam](rng)
        rows.append({"prompt": prompt, "response": response, "family": fam, "corruption": "", "_src": src,
                     "_wrong": wrong})
    bad = rng.sample(range(n), round(corrupt * n))
    kinds = ["swap", "copy", "wrong"]
    for j, i in enumerate(sorted(bad)):
        r, kind = rows[i], kinds[j % 3]
        if kind == "swap":
            other = rng.choice([x for x in rows if x["family"] != r["family"]])
            r["response"] = other["response"]
        elif kind == "copy":
            r["response"] = " " + r["_src"]
        else:
            r["response"] = r["_wrong"]
        r["corruption"] = kind
    for r in rows:
        del r["_src"], r["_wrong"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="infra/demo/data")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--valid", type=int, default=60)
    ap.add_argument("--corrupt", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    for name, rows in (("train", make_rows(a.train, rng, a.corrupt)), ("valid", make_rows(a.valid, rng, 0.0))):
        if name == "valid":
            for r in rows:
                del r["corruption"]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {out / (name + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()

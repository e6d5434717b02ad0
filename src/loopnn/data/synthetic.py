"""`recall`: a synthetic corpus on which one transformer block cannot do what two block applications can.

Each line is a random string of 8 to 40 symbols, a `|`, and the same string again:

    q7Tz-k2|q7Tz-k2

The first copy is noise (about ln 93 = 4.53 nats per symbol for any model). Every symbol of the second copy after
its first is predictable, but only by in-context copying: find where the current symbol occurred before and emit
the symbol that followed it. That takes two attention steps that compose (one moves each symbol's predecessor into
its position, the next matches on it); one attention layer cannot, and no fixed offset helps, because the length
varies. So a 1-block model stays near the noise level on the second copy while a 2-block model, or 1 block looped
twice, learns to copy it almost exactly: the mechanism behind the depth gain on text (docs/results.md), isolated
so it separates within minutes. Generated from a fixed seed with Python's `random` (stable across versions), so it
is the same bytes everywhere.
"""

from __future__ import annotations

import random
import string

# 93 printable symbols: letters, digits and punctuation, without the separator `|` and whitespace
RECALL_SYMBOLS = "".join(sorted(set(string.ascii_letters + string.digits + string.punctuation) - {"|"}))
RECALL_LINES = 8  # lines per document
RECALL_DOCUMENTS = 12_000  # about 4.4 MB, 2.2M training tokens with the bytes tokenizer after the 10% val split


def recall_line(rng: random.Random, shortest: int = 8, longest: int = 40) -> str:
    """One `s|s` line, s a random string of shortest..longest symbols."""
    s = "".join(rng.choice(RECALL_SYMBOLS) for _ in range(rng.randint(shortest, longest)))
    return f"{s}|{s}"


def recall_documents(n_documents: int = RECALL_DOCUMENTS, seed: int = 0) -> list[tuple[str, str]]:
    """(name, text) pairs: `n_documents` documents of RECALL_LINES lines each."""
    rng = random.Random(seed)
    return [
        (f"recall#{i}", "\n".join(recall_line(rng) for _ in range(RECALL_LINES)) + "\n") for i in range(n_documents)
    ]


# `hops`: two-hop lookups. Each line lists a random permutation f of 8 names as 8 fact tokens (one symbol per
# (name, f(name)) pair, in random order), then queries: a name x and the answer f(f(x)).
HOPS_NAMES = "12345678"
HOPS_FACTS = (string.ascii_letters + "!#$%&*+-=?@^~{}<>")[:64]  # fact symbol of (a, b): HOPS_FACTS[8 * a + b]
HOPS_QUERIES = 4  # queries per line
HOPS_DOCUMENTS = 20_000  # 8 lines each: about 4.3 MB, one byte per token


def hops_line(rng: random.Random) -> str:
    """`<8 fact symbols>:<x f(f(x))> x 4`, e.g. `Qd...:3742...`: one attention step finds f(x) in the facts, a
    second finds f(f(x)); one block applied once can take only the first."""
    n = len(HOPS_NAMES)
    f = list(range(n))
    rng.shuffle(f)
    order = list(range(n))
    rng.shuffle(order)
    facts = "".join(HOPS_FACTS[n * a + f[a]] for a in order)
    queries = "".join(HOPS_NAMES[x] + HOPS_NAMES[f[f[x]]] for x in rng.sample(range(n), HOPS_QUERIES))
    return f"{facts}:{queries}"


def hops_documents(n_documents: int = HOPS_DOCUMENTS, seed: int = 0) -> list[tuple[str, str]]:
    """(name, text) pairs of 8 `hops_line`s each."""
    rng = random.Random(seed)
    return [(f"hops#{i}", "\n".join(hops_line(rng) for _ in range(8)) + "\n") for i in range(n_documents)]


# `copies`: the default demo's task. Each line is a random string of 4 to 12 symbols from a 16-letter alphabet,
# written three times with `|` between: `gkbpa|gkbpa|gkbpa`. The first copy is noise (ln 16 = 2.77 nats per symbol
# for any model); the repeats are predictable only by in-context copying, the two-step circuit `recall` isolates,
# and with a small alphabet, short lines and a short context a looped block learns it within minutes on 2 cores
# (about 2,000 steps at width 128), where a single block does not (docs/results.md, "The first ten minutes").
COPIES_SYMBOLS = "abcdefghijklmnop"
COPIES_REPEATS = 3
COPIES_DOCUMENTS = 20_000  # 8 lines each: 3.93M training tokens (bytes), so 4,000 steps of 16 x 64 are about 1 epoch


def copies_line(
    rng: random.Random,
    shortest: int = 4,
    longest: int = 12,
    symbols: str = COPIES_SYMBOLS,
    repeats: int = COPIES_REPEATS,
) -> str:
    """One `s|s|s` line (`repeats` copies), s a random string of shortest..longest of `symbols`."""
    s = "".join(rng.choice(symbols) for _ in range(rng.randint(shortest, longest)))
    return "|".join([s] * repeats)


def copies_documents(n_documents: int = COPIES_DOCUMENTS, seed: int = 0) -> list[tuple[str, str]]:
    """(name, text) pairs of 8 `copies_line`s each."""
    rng = random.Random(seed)
    return [(f"copies#{i}", "\n".join(copies_line(rng) for _ in range(8)) + "\n") for i in range(n_documents)]

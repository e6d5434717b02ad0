"""The synthetic corpora: `recall` (a string, `|`, the same string), `hops` (two-hop lookups) and `copies` (a
string three times), the same bytes from every call."""

import hashlib

from loopnn.data.sources import BUILTIN_SOURCES, read_documents
from loopnn.data.synthetic import RECALL_LINES, RECALL_SYMBOLS, recall_documents


def test_recall_lines_repeat_their_string_after_the_bar():
    docs = recall_documents(50, seed=3)
    assert len(docs) == 50 and len({name for name, _ in docs}) == 50
    for _, text in docs:
        lines = text.rstrip("\n").split("\n")
        assert len(lines) == RECALL_LINES
        for line in lines:
            first, second = line.split("|")  # exactly one bar
            assert first == second and 8 <= len(first) <= 40 and set(first) <= set(RECALL_SYMBOLS)
    assert "|" not in RECALL_SYMBOLS and not any(c.isspace() for c in RECALL_SYMBOLS)


def test_recall_is_the_same_bytes_on_every_call_and_differs_by_seed():
    def digest(docs):
        return hashlib.sha256("".join(text for _, text in docs).encode()).hexdigest()

    assert digest(recall_documents(200)) == digest(recall_documents(200))
    assert digest(recall_documents(200, seed=1)) != digest(recall_documents(200))
    assert "recall" in BUILTIN_SOURCES and read_documents("recall")[:5] == recall_documents()[:5]


def test_hops_answers_are_two_lookups_in_their_lines_facts():
    from loopnn.data.synthetic import HOPS_FACTS, HOPS_NAMES, HOPS_QUERIES, hops_documents

    n = len(HOPS_NAMES)
    decode = {c: divmod(i, n) for i, c in enumerate(HOPS_FACTS)}  # fact symbol -> (name, its image)
    for _, text in hops_documents(30, seed=5):
        for line in text.rstrip("\n").split("\n"):
            facts, queries = line.split(":")
            f = dict(decode[c] for c in facts)
            assert sorted(f) == list(range(n)) and sorted(f.values()) == list(range(n))  # a permutation
            assert len(queries) == 2 * HOPS_QUERIES
            for x, answer in zip(queries[::2], queries[1::2]):
                a = HOPS_NAMES.index(x)
                assert HOPS_NAMES.index(answer) == f[f[a]]
    assert hops_documents(40) == hops_documents(40) != hops_documents(40, seed=1)


def test_copies_lines_are_one_string_three_times():
    from loopnn.data.synthetic import COPIES_REPEATS, COPIES_SYMBOLS, copies_documents

    docs = copies_documents(40, seed=2)
    assert docs == copies_documents(40, seed=2) != copies_documents(40)
    for _, text in docs:
        for line in text.rstrip("\n").split("\n"):
            parts = line.split("|")
            assert len(parts) == COPIES_REPEATS and len(set(parts)) == 1
            assert 4 <= len(parts[0]) <= 12 and set(parts[0]) <= set(COPIES_SYMBOLS)
    assert "copies" in BUILTIN_SOURCES and read_documents("copies")[:3] == copies_documents()[:3]


def test_copies_mask_marks_the_repeats_and_nothing_else():
    import torch

    from loopnn.evaluate import copies_mask

    text = "x|kx\nkx|kx|kx\nab|ab|ab\nc"  # a window that starts inside a line: its repeats are not counted
    idx = torch.tensor([[ord(c) for c in text[:-1]]])
    targets = torch.tensor([[ord(c) for c in text[1:]]])
    marked = [t + 1 for t in range(len(text) - 1) if copies_mask(idx, targets)[0, t]]
    # the targets of the second and third copies (their symbols and the bar between them), never the first copy,
    # the bar after it or the line's end
    assert "".join(text[t] for t in marked) == "kx|kxab|ab" and marked[0] == 8 and marked[5] == 17

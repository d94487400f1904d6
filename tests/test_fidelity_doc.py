"""docs/fidelity.md keeps its promises: numbered rows, every test it names exists, every "same" row names one, every
"different" row names its switch or says why there is none, and every "as the reference" claim is listed."""
import os
import re

import pytest

DOC = "docs/fidelity.md"
SEARCHED = ["README.md", "docs", "ldm", "scripts", "main.py"]  # as `grep -rn "as the reference"` in the ledger


def read_doc():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def ledger():
    return [cells(line) for line in read_doc().splitlines() if re.match(r"\| \*\*\d+\*\* ", line)]


def named_tests(text):
    """(file, test) pairs; `::test_y` right after `tests/x.py::test_x` is another test of tests/x.py."""
    found, current = [], None
    for path, name in re.findall(r"(tests/[\w/]+\.py)?::(test_\w+)", text):
        current = path or current
        found.append((current, name))
    return found


def test_rows_are_numbered_and_say_same_or_different():
    rows = ledger()
    assert len(rows) >= 30
    assert [int(re.match(r"\*\*(\d+)\*\*", r[0]).group(1)) for r in rows] == list(range(1, len(rows) + 1))
    assert all(len(r) == 5 and re.match(r"(same|different)\b", r[3]) for r in rows), [r[0] for r in rows if len(r) != 5]


def test_every_named_test_exists():
    pairs = named_tests(read_doc())
    assert len(pairs) > 30
    for path, name in pairs:
        assert path and os.path.isfile(path), (path, name)
        with open(path, encoding="utf-8") as f:
            assert re.search(rf"^def {name}\(", f.read(), re.M), f"{path}::{name} named in {DOC} does not exist"


@pytest.mark.parametrize("kind, rule", [("same", r"tests/[\w/]+\.py::test_\w+"), ("different", r"Switch:|No switch")])
def test_each_row_names_its_test_or_switch(kind, rule):
    missing = [r[0] for r in ledger() if r[3].startswith(kind) and not re.search(rule, r[4])]
    assert not missing, f"{kind} rows without {rule}: {missing}"


def test_every_as_the_reference_statement_is_listed():
    found = {}
    for top in SEARCHED:
        walk = [("", [], [top])] if os.path.isfile(top) else os.walk(top)
        for folder, _, files in walk:
            for name in files:
                path = os.path.join(folder, name)
                if path == DOC or not path.endswith((".py", ".md", ".sh")):
                    continue
                with open(path, encoding="utf-8") as f:
                    count = f.read().count("as the reference")
                if count:
                    found[path] = count
    statements = re.search(r'## "as the reference" statements.*?\n## ', read_doc(), re.S).group(0)
    listed = {}
    for row in statements.splitlines():
        m = re.match(r"\| `?([\w./-]+)`?", row)
        if m and os.path.exists(m.group(1)):
            listed[m.group(1)] = listed.get(m.group(1), 0) + 1
    assert listed == found

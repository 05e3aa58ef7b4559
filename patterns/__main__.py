"""``python -m patterns`` rewrites the corpus table in docs/corpus.md."""

from __future__ import annotations

import pathlib

from . import idiom_table

START, END = "<!-- idioms:start -->", "<!-- idioms:end -->"
README = pathlib.Path(__file__).resolve().parent.parent / "docs" / "corpus.md"


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _old, tail = rest.split(END, 1)
    return f"{head}{START}\n{idiom_table()}\n{END}{tail}"


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")

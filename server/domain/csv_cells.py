"""CSV that a person may open in a spreadsheet (statements, bank files): a text cell must never run as
a formula (SPEC §4). The OWASP rule: a text cell that begins with `=`, `+`, `-`, `@`, TAB or CR is
prefixed with a single quote, which spreadsheets show as text and do not evaluate.

Only text goes through `text_cell`: amounts are written as plain numbers (`-12.50` stays a number a
spreadsheet adds up), and so are ids.
"""

from __future__ import annotations

FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_LEADS) else value


def text_cells(*values: str) -> list[str]:
    return [text_cell(v) for v in values]

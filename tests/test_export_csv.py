"""ExportStatement's CSV: every line of a long statement, chunked, and cells a spreadsheet would
run as formulas neutralised (SPEC §4), on each database."""

from __future__ import annotations

import csv
import io

from cobalt.payments.v1 import payments_pb2 as pb


def test_formula_cells_are_neutralised(server, admin, app):
    admin.upsert_member(2, "=HYPERLINK(\"http://x\")")
    admin.adjust(100_000, "@SUM(A1:A9)", member_id=1)
    app.transfer(2, 1_000, from_member_id=1, description="+61 400 000 000")
    app.transfer(2, 500, from_member_id=1, description="table money")
    rows = list(csv.reader(io.StringIO(app.export_statement(member_id=1).decode())))
    assert [r[4] for r in rows[1:]] == ["table money", "'+61 400 000 000", "'@SUM(A1:A9)"]
    assert rows[1][1] == "'=HYPERLINK(\"http://x\") (member 2)"
    assert rows[3][1] == "adjustments" and rows[3][5] == "1000.00" and rows[1][5] == "-5.00"


def test_a_long_statement_comes_whole_in_chunks(server, admin, app):
    admin.adjust(1_000_000, "opening", member_id=1)
    for n in range(1, 1_201):
        admin.adjust(-n, f"line {n}, with a comma and a \"quote\"", member_id=1)
    with server.client("app") as client:
        chunks = list(client.stream("ExportStatement", pb.ExportStatementRequest(account=pb.AccountRef(member_id=1)),
                                    60))
    data = b"".join(c.data for c in chunks)
    assert all(c.data.endswith(b"\r\n") for c in chunks)  # chunks end at a line's end
    rows = list(csv.reader(io.StringIO(data.decode())))
    assert len(rows) == 1 + 1_201
    assert [r[4] for r in rows[1:4]] == ['line 1200, with a comma and a "quote"', 'line 1199, with a comma and a "quote"',
                                         'line 1198, with a comma and a "quote"']
    balances = [int(r[6].replace(".", "")) for r in rows[1:]]
    amounts = [int(r[5].replace(".", "")) for r in rows[1:]]
    assert all(balances[i] == balances[i + 1] + amounts[i] for i in range(len(rows) - 2))

from cobalt.payments.v1 import payments_pb2 as pb


def test_pay_from_balance(server, app, admin):
    admin.upsert_organisation(7, "Bridge Club")
    admin.adjust(10_000, "opening credit", member_id=1)
    resp = app.pay(1, 2_500, organisation_id=7, description="Entry", route_code="EVT")
    assert resp.status == pb.SUCCEEDED
    assert resp.balance_cents == 7_500
    assert app.balance_cents(organisation_id=7) == 2_500
    st = app.get_statement(member_id=1)
    assert [line.amount_cents for line in st.lines] == [-2_500, 10_000]
    assert [line.balance_after_cents for line in st.lines] == [7_500, 10_000]

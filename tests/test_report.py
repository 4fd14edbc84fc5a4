"""The accuracy report's rows across modes (python -m hyq_tvm.report)."""
from hyq_tvm.cli.report import markdown, merged


def _row(method, mode, wbits, top1):
    row = {"model": "mobilevit_xxs", "method": method, "wbits": wbits, "abits": wbits, "top1": top1,
           "calib_seconds": 1.0, "test_images": 10}
    return row if mode is None else {**row, "mode": mode}


def test_rows_from_before_modes_are_partial_and_kept_unless_replaced():
    old = [_row("fp32", None, 32, 90.0), _row("qhyvit", None, 8, 89.0), _row("minmax", None, 8, 88.0)]
    new = [_row("qhyvit", "partial", 8, 89.5), _row("qhyvit", "integer", 8, 89.2)]
    rows = merged(old, new)
    assert [(r["method"], r["mode"], r["top1"]) for r in rows] == [
        ("fp32", "fp32", 90.0), ("minmax", "partial", 88.0), ("qhyvit", "partial", 89.5), ("qhyvit", "integer", 89.2)]


def test_the_table_has_a_line_per_mode_and_method_that_has_rows():
    rows = merged([_row("fp32", None, 32, 90.0), _row("minmax", None, 8, 88.0)], [_row("qhyvit", "integer", 8, 89.2)])
    table = markdown(rows, [], {}, 1)
    assert "| mobilevit_xxs | 90.00 | minmax | partial | 88.00 | - | - | 1.0 |" in table
    assert "| mobilevit_xxs | 90.00 | qhyvit | integer | 89.20 | - | - | 1.0 |" in table
    assert "minmax | integer" not in table and "qhyvit | partial" not in table

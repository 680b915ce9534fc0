import io

from kitsprep.progress import Progress


def test_plain_stream_gets_one_line_per_item_and_notes():
    out = io.StringIO()
    p = Progress(out).start(3, "build", unit="case")
    assert not p.showing_bar
    p.advance(1)
    p.item_done("case_00000", "12 slices")
    p.note("skipped case_00001: bad mask")
    p.close()
    assert out.getvalue().splitlines() == ["case_00000  12 slices", "skipped case_00001: bad mask"]


def test_bar_mode_draws_a_bar_and_keeps_notes():
    out = io.StringIO()
    p = Progress(out, bar=True).start(4, "fit", unit="step", initial=1)
    assert p.showing_bar
    p.advance(2, postfix="loss 0.5")
    p.note("validation: dice 0.9")
    p.close()
    text = out.getvalue()
    assert "fit" in text and "3/4" in text and "validation: dice 0.9" in text


def test_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress(out, enabled=False).start(2, "x")
    p.item_done("a")
    p.note("b")
    p.close()
    assert out.getvalue() == ""

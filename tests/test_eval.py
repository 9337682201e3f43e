import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from jomed_fast.eval import (
    accuracy,
    exact_match,
    macro_f1,
    multilabel_macro_f1,
    open_token_scores,
    subset_accuracy,
    token_prf,
)


@st.composite
def pairs(draw):
    c, n = draw(st.integers(2, 6)), draw(st.integers(1, 30))
    lab = st.lists(st.integers(0, c - 1), min_size=n, max_size=n)
    return c, draw(lab), draw(lab)


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_multiclass_vs_sklearn(case):
    c, p, t = case
    assert accuracy(p, t) == pytest.approx(accuracy_score(t, p))
    assert macro_f1(p, t, c) == pytest.approx(f1_score(t, p, average="macro", labels=list(range(c)), zero_division=0))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(
                st.tuples(st.frozensets(st.integers(0, c - 1)), st.frozensets(st.integers(0, c - 1))),
                min_size=1,
                max_size=20,
            ),
        )
    )
)
def test_multilabel_vs_sklearn(case):
    c, rows = case
    p, t = [r[0] for r in rows], [r[1] for r in rows]
    mlb = MultiLabelBinarizer(classes=list(range(c)))
    P, T = mlb.fit_transform(p), mlb.transform(t)
    assert multilabel_macro_f1(p, t, c) == pytest.approx(f1_score(T, P, average="macro", zero_division=0))
    assert subset_accuracy(p, t) == pytest.approx(accuracy_score(T, P))


@pytest.mark.parametrize(
    "pred,gold,prf",
    [
        ("the cat sat", "a cat sat down", (1.0, 2 / 3, 0.8)),
        ("Denver Broncos", "Denver Broncos!", (1.0, 1.0, 1.0)),
        ("left lung", "right lung", (0.5, 0.5, 0.5)),
        ("nothing", "pneumonia", (0.0, 0.0, 0.0)),
        ("the", "a", (1.0, 1.0, 1.0)),
    ],
)
def test_token_prf_squad(pred, gold, prf):
    assert token_prf(pred, gold) == pytest.approx(prf)


def test_open_and_exact():
    assert exact_match(["Yes.", "no"], ["yes", "yes"]) == 0.5
    s = open_token_scores(["left lung", "x"], ["right lung", "x"])
    assert s["f1"] == pytest.approx(0.75)


def test_errors_name_argument():
    with pytest.raises(ValueError, match="preds"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="targets"):
        macro_f1([0], [5], 3)
    with pytest.raises(ValueError, match="preds"):
        multilabel_macro_f1([{7}], [{0}], 3)

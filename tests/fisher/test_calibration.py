"""`CalibrationStream`: endless batches from a re-iterable source; clear errors for an empty or one-pass source."""

import pytest

from fls_hf.errors import RecipeError
from fls_hf.fisher.calibration import CalibrationStream


def test_a_list_is_re_iterated_endlessly():
    stream = CalibrationStream([{"x": 1}, {"x": 2}])
    assert [b["x"] for b in stream.take(5)] == [1, 2, 1, 2, 1]


def test_an_empty_source_says_so():
    with pytest.raises(RecipeError, match="empty calibration dataloader"):
        CalibrationStream([]).next()


def test_a_one_pass_iterator_that_runs_dry_names_the_cause():
    stream = CalibrationStream(iter([{"x": 1}, {"x": 2}]))
    assert [b["x"] for b in stream.take(2)] == [1, 2]
    with pytest.raises(RecipeError, match="one-pass iterator"):
        stream.next()

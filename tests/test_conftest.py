"""The real-CT data fixture: skipped on a user's machine, an error in CI."""

import pytest
from conftest import require_shared_data


def test_missing_data_skips_outside_ci(tmp_path):
    with pytest.raises(pytest.skip.Exception):
        require_shared_data(tmp_path, ci=False)


def test_missing_data_fails_in_ci(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_shared_data(tmp_path, ci=True)


def test_present_data_is_returned(tmp_path):
    (tmp_path / "totalseg-example").mkdir()
    assert require_shared_data(tmp_path, ci=True) == tmp_path

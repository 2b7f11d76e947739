"""kernels.cbuild's shared pieces: a kernel that cannot be built is reported and answered with None (its callers
then take their fallback path), one that builds is loaded; a kernel switch reads the environment per call."""

from __future__ import annotations

import logging

import pytest

from kernels import cbuild


def test_a_library_that_does_not_build_is_none_and_named(tmp_path, caplog):
    bad = tmp_path / "bad.c"
    bad.write_text("int f(void) { return }\n")
    with caplog.at_level(logging.WARNING, logger="kernels.cbuild"):
        assert cbuild.open_library(bad, "test_bad_kernel", "the test's fallback") is None
    assert "test_bad_kernel" in caplog.text and "the test's fallback" in caplog.text


def test_a_library_that_builds_is_loaded(tmp_path):
    good = tmp_path / "good.c"
    good.write_text("int twice(int x) { return 2 * x; }\n")
    lib = cbuild.open_library(good, "test_good_kernel", "nothing")
    assert lib is not None and lib.twice(21) == 42


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False),
                                      (" Off ", False), ("NO", False)])
def test_a_switch_is_on_unless_the_environment_turns_it_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("RECSYS_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("RECSYS_TEST_SWITCH", value)
    assert cbuild.switch_on("RECSYS_TEST_SWITCH") is on

import logging
import warnings

from pocketformer.progress import quiet


def test_quiet_swallows_prints_warnings_and_library_logs(capsys, caplog):
    lib = logging.getLogger("somelib.sub")
    with caplog.at_level(logging.INFO):
        with quiet("somelib"):
            print("page of converter output")
            warnings.warn("internal detail")
            lib.warning("noise")
            lib.error("a real failure")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == ["a real failure"]


def test_quiet_restores_the_loggers_levels_afterwards():
    parent, child = logging.getLogger("otherlib"), logging.getLogger("otherlib.child")
    parent.setLevel(logging.INFO)
    child.setLevel(logging.DEBUG)
    with quiet("otherlib"):
        assert (parent.level, child.level) == (logging.ERROR, logging.ERROR)
    assert (parent.level, child.level) == (logging.INFO, logging.DEBUG)


def test_quiet_restores_levels_when_the_work_fails():
    lib = logging.getLogger("failinglib")
    lib.setLevel(logging.WARNING)
    try:
        with quiet("failinglib"):
            raise RuntimeError("conversion failed")
    except RuntimeError:
        pass
    assert lib.level == logging.WARNING

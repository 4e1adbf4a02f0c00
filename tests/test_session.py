"""Sessions of the tool: onnxruntime's intra-op threads spin only where a run's latency is measured."""

import pytest

from onnxcompress.core import proto
from onnxcompress.runtime import bench
from onnxcompress.runtime.session import make_session

_SPIN = "session.intra_op.allow_spinning"


def _spin_entry(session) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(_SPIN)
    except Exception:  # onnxruntime raises for an entry never set (its default: spinning on)
        return None


def test_sessions_do_not_spin_by_default():
    assert _spin_entry(make_session(proto.identity_model())) == "0"


def test_spin_keeps_onnxruntime_default():
    assert _spin_entry(make_session(proto.identity_model(), spin=True)) in (None, "1")


@pytest.mark.parametrize("optimize", [False, True])
def test_timing_sessions_spin(optimize):
    session = bench._session(proto.identity_model(), "m", "CPUExecutionProvider", 1, optimize)
    assert _spin_entry(session) in (None, "1")

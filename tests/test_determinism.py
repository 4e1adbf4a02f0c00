"""Every registered pass: same input, options and seed give byte-identical output.

The passes come from :func:`onnxcompress.core.pass_api.registry`, so a new pass is covered as soon as it
is registered. :data:`OPTIONS` gives options where the defaults are not enough (or depend on
timing); a pass missing from it runs with its defaults. Every pass gets the same calibration
source (a slice of ``models/digits_calib.npz``), used or not.

Each pass runs twice in this process, and once more in a fresh interpreter with another
``PYTHONHASHSEED`` (this module run as a script prints the SHA-256 of every pass's output), so
set/dict iteration order, object ids and hash randomisation cannot leak into the output.

Run as a script: ``python -m tests.test_determinism`` prints ``{pass: sha256}`` as JSON.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import onnx

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.runtime.data import open_source
from tests.helpers.runs import ROOT, builtin_passes, python_env

MODEL = ROOT / "models" / "resnet_digits.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
CALIB_SAMPLES = 32
SEED = 7

#: Options per pass where the defaults are not enough; an option the pass does not (yet) have is
#: dropped, so a table entry never breaks a pass. ``latency_aware`` picks QDQ placement by timing, and
#: ``quantize_weights:prefer=speed`` (its default) reverts layers by timing: both are pinned.
OPTIONS: dict[str, dict[str, str]] = {
    "prune_channels": {"ratio": "0.5"},
    "quantize_int8": {"latency_aware": "false"},
    "quantize_weights": {"prefer": "size"},
    "factorize_svd": {"rank_ratio": "0.5", "max_mac_ratio": "1.0"},
    "factorize_tucker": {"rank_ratio": "0.5", "max_mac_ratio": "1.0", "iters": "2"},
    "factorize_dwsep": {"rank": "1", "max_mac_ratio": "1.0"},
    "equalize": {},
    "bias_correction": {},
}

#: Passes that read what another pass writes run after it (the manager refuses them alone).
BEFORE: dict[str, str] = {"bias_correction": "quantize_int8:latency_aware=false"}


def pass_names() -> list[str]:
    """Every registered pass, sorted."""
    return sorted(builtin_passes())


def spec_of(name: str) -> str:
    """``name`` with its table options that the registered pass knows (after its :data:`BEFORE` pass)."""
    known = builtin_passes()[name].options
    opts = {k: v for k, v in OPTIONS.get(name, {}).items() if k in known}
    spec = ":".join([name, *(f"{k}={v}" for k, v in sorted(opts.items()))])
    return f"{BEFORE[name]},{spec}" if name in BEFORE else spec


def run_pass(name: str, model: onnx.ModelProto) -> tuple[bytes, bool]:
    """Serialized output of the pass ``name`` on ``model`` (not modified) with a fresh context,
    and whether the pass (the last one of its spec) changed the graph."""
    ctx = PassContext(calib=open_source(str(CALIB), model, limit=CALIB_SAMPLES), seed=SEED)
    out, records = PassManager(parse_spec(spec_of(name)), ctx).run(serde.load_model(model))
    return out.SerializeToString(), records[-1].result.modified


def digests() -> dict[str, str]:
    """SHA-256 of every pass's output on the fixture model."""
    model = onnx.load(str(MODEL))
    return {name: hashlib.sha256(run_pass(name, model)[0]).hexdigest() for name in pass_names()}


# ---------------------------------------------------------------- tests (collected by pytest only)

if __name__ != "__main__":
    import pytest

    @pytest.fixture(scope="module")
    def model() -> onnx.ModelProto:
        return onnx.load(str(MODEL))

    @pytest.fixture(scope="module")
    def outputs(model) -> dict[str, tuple[bytes, bool]]:
        return {name: run_pass(name, model) for name in pass_names()}

    @pytest.mark.parametrize("name", pass_names())
    def test_same_bytes_twice_in_one_process(name, model, outputs):
        before = model.SerializeToString()
        again, modified = run_pass(name, model)
        assert model.SerializeToString() == before, f"{name} modified its input model"
        assert again == outputs[name][0], f"{name}: two runs with the same input, options and seed differ"
        onnx.checker.check_model(onnx.load_from_string(again), full_check=True)
        if name in OPTIONS:  # the table's options make these passes fire on the fixture model
            assert modified, f"{name} changed nothing: its determinism is not tested"

    def test_same_bytes_in_a_fresh_process_with_another_hash_seed(outputs):
        env = python_env(PYTHONHASHSEED="12345", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "tests.test_determinism"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = {name: hashlib.sha256(data).hexdigest() for name, (data, _) in outputs.items()}
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        assert not differ, f"output differs in a fresh process with another PYTHONHASHSEED: {differ}"

    def test_refit_bytes_do_not_depend_on_the_blas_thread_count(model):
        """Least-squares refits on all the calibration data (big enough for OpenBLAS to split its
        work) give the same bytes with one BLAS thread (as in Ray workers) or two."""
        from threadpoolctl import threadpool_limits

        def run() -> bytes:
            ctx = PassContext(calib=open_source(str(CALIB), model), seed=SEED)
            out, _ = PassManager(parse_spec("prune_channels:ratio=0.5"), ctx).run(serde.load_model(model))
            return out.SerializeToString()

        with threadpool_limits(limits=2, user_api="blas"):
            two = run()
        with threadpool_limits(limits=1, user_api="blas"):
            one = run()
        assert two == one

    def test_table_names_only_known_options_or_future_passes():
        """A typo in :data:`OPTIONS` would silently test defaults: every key must be an option of
        its pass (passes not registered yet are allowed)."""
        passes = builtin_passes()
        future = {"latency_aware"}  # quantize_int8 option being added
        for name, opts in OPTIONS.items():
            if name in passes:
                assert set(opts) - future <= set(passes[name].options), name


if __name__ == "__main__":
    print(json.dumps(digests(), sort_keys=True))

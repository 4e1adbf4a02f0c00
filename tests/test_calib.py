import numpy as np
import onnx
import pytest
from PIL import Image

from onnxcompress.core import fileio
from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import parse_dims
from onnxcompress.runtime.data import (
    FileSource,
    ImageFolderSource,
    IterableSource,
    RandomSource,
    input_specs,
    open_source,
)
from onnxcompress.runtime.preprocess import parse_preprocess
from tests.helpers.builders import parse

IMG = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4,4] x) => (float[N,3,4,4] y) { y = Relu(x) }""")
FIXED = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2] x, int64[1,3] ids) => (float[1,2] y) { y = Relu(x) }""")


def _npz(path, n=10, **extra):
    arrays = {"x": np.arange(n * 48, dtype=np.float32).reshape(n, 3, 4, 4), **extra}
    np.savez(path, **arrays)
    return path


def test_npz_batches_and_labels(tmp_path):
    src = FileSource(_npz(tmp_path / "d.npz", labels=np.arange(10)), input_specs(IMG))
    batches = list(src.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.array_equal(np.concatenate([b.labels for b in batches]), np.arange(10))
    assert np.array_equal(batches[1].feeds["x"][0], np.arange(48 * 4, 48 * 5).reshape(3, 4, 4))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_is_read_a_few_samples_at_a_time(tmp_path, monkeypatch, save):
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    save(tmp_path / "d.npz", x=x, labels=np.arange(10))
    whole = list(FileSource(tmp_path / "d.npz", input_specs(IMG)).batches(4))
    monkeypatch.setattr(fileio, "ROWS_BYTES", 3 * 48 * 4)  # three samples per read
    chunks = list(fileio.array_rows(tmp_path / "d.npz"))
    assert [len(c["x"]) for c in chunks] == [2, 2, 2, 2, 2]  # 3 samples' bytes hold 2 with their labels
    cut = list(FileSource(tmp_path / "d.npz", input_specs(IMG)).batches(4))
    assert [len(b) for b in cut] == [len(b) for b in whole] == [4, 4, 2]
    for a, b in zip(whole, cut):
        assert np.array_equal(a.feeds["x"], b.feeds["x"]) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.concatenate([b.feeds["x"] for b in cut]), x)


def test_stored_npz_members_are_read_from_the_file_directly(tmp_path, monkeypatch):
    """Uncompressed members skip zipfile's reader (its local header's extra field is skipped by its
    own length); compressed ones still go through it."""
    import zipfile

    x = np.random.default_rng(1).standard_normal((6, 3, 4, 4)).astype(np.float32)
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        info = zipfile.ZipInfo("x.npy")
        info.extra = b"\xfe\xca\x04\x00pad!"  # a private extra block (id 0xcafe, 4 bytes)
        zf.writestr(info, _npy_bytes(x))
        zf.writestr(zipfile.ZipInfo("labels.npy"), _npy_bytes(np.arange(6)), compress_type=zipfile.ZIP_DEFLATED)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    monkeypatch.setattr(fileio, "ROWS_BYTES", 2 * 48 * 4)
    chunks = list(fileio.array_rows(tmp_path / "d.npz"))
    assert opened == ["labels.npy"]
    assert np.array_equal(np.concatenate([c["x"] for c in chunks]), x)
    assert np.array_equal(np.concatenate([c["labels"] for c in chunks]), np.arange(6))


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_npz_memory_does_not_grow_with_the_file(tmp_path):
    import tracemalloc

    np.savez(tmp_path / "big.npz", x=np.ones((2000, 3, 4, 4), np.float32) * np.arange(2000, dtype=np.float32)[:, None, None, None])
    src = FileSource(tmp_path / "big.npz", input_specs(IMG))
    src_total = 0.0
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fileio, "ROWS_BYTES", 4096)
            for b in src.batches(8):
                src_total += float(b.feeds["x"][:, 0, 0, 0].sum())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert src_total == sum(range(2000))
    assert peak < 100_000  # the file holds 384 kB; one read 4 kB, one batch 1.5 kB


def test_npz_with_a_rank_reduced_single_sample_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "ROWS_BYTES", 16)  # would cut the sample's first axis
    np.savez(tmp_path / "one.npz", x=np.arange(48, dtype=np.float32).reshape(3, 4, 4))
    (b,) = list(FileSource(tmp_path / "one.npz", input_specs(IMG)).batches())
    assert np.array_equal(b.feeds["x"][0], np.arange(48, dtype=np.float32).reshape(3, 4, 4))


def test_folder_streams_files_in_order_and_limit(tmp_path):
    for i in range(3):
        _npz(tmp_path / f"part{i}.npz", n=3)
    src = open_source(tmp_path, IMG, limit=7)
    assert src.count() == 7
    assert [len(b) for b in src.batches(5)] == [5, 2]


def test_count_reads_headers_only_and_falls_back_to_a_full_read(tmp_path, monkeypatch):
    for i in range(3):
        _npz(tmp_path / f"part{i}.npz", n=3 + i)
    src, limited = open_source(tmp_path, IMG), open_source(tmp_path, IMG, limit=7)

    def no_data(*_a):
        raise AssertionError("data read")

    with monkeypatch.context() as mp:
        mp.setattr(fileio, "_read_rows", no_data)
        assert src.count() == 12  # 3 + 4 + 5, from the headers
        assert limited.count() == 7
    np.savez(tmp_path / "part3.npz", x=np.zeros((3, 4, 4), np.float32))  # one sample, no sample axis: read whole
    assert open_source(tmp_path, IMG).count() == 13 == sum(len(b) for b in open_source(tmp_path, IMG).batches())


SEQ = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,L] x) => (float[N,2,L] y) { y = Relu(x) }""")
SEQ1 = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,L] x) => (float[1,2,L] y) { y = Relu(x) }""")


@pytest.mark.parametrize("model", [SEQ, SEQ1])
def test_batch_counts_come_from_the_headers(tmp_path, monkeypatch, model):
    from onnxcompress.runtime.segments import batch_count, batches

    for i, (n, length) in enumerate([(3, 5), (4, 5), (2, 7), (5, 5), (1, 5)]):  # stretches of 7, 2 and 6 samples
        np.savez(tmp_path / f"part{i}.npz", x=np.ones((n, 2, length), np.float32), labels=np.arange(n))
    for limit in (None, 3, 7, 8, 12, 100):
        src = open_source(tmp_path, model, limit=limit)
        for size in (1, 2, 4, 32):
            want = [sum(1 for _ in src.batches(size)), sum(1 for _ in batches(src, size))]
            with monkeypatch.context() as mp:
                mp.setattr(fileio, "_read_rows", lambda *_a: pytest.fail("data read"))
                assert [src.batch_count(size), batch_count(src, size)] == want, (limit, size)
    assert open_source(tmp_path, SEQ).shape_runs() == [7, 2, 6]
    np.savez(tmp_path / "part2.npz", x=np.ones((0, 2, 7), np.float32), labels=np.arange(0))  # empty file: read
    src = open_source(tmp_path, SEQ)
    assert src.shape_runs() is None and src.batch_count(4) == sum(1 for _ in src.batches(4))


def test_a_bad_first_file_fails_on_its_first_row(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((500, 3, 4, 5), np.float32))
    with pytest.raises(InputError, match="expects shape"):
        FileSource(tmp_path / "bad.npz", input_specs(IMG))


def test_single_sample_gets_batch_axis_and_float64_cast(tmp_path):
    np.save(tmp_path / "one.npy", np.ones((3, 4, 4), np.float64))
    (b,) = list(open_source(tmp_path, IMG).batches())
    assert b.feeds["x"].shape == (1, 3, 4, 4) and b.feeds["x"].dtype == np.float32


@pytest.mark.parametrize("arrays, match", [
    ({"nope": np.zeros((2, 3, 4, 4), np.float32)}, "unknown input name"),
    ({"x": np.zeros((2, 3, 5, 4), np.float32)}, r"expects shape \[\?,3,4,4\]"),
    ({"x": np.zeros((2, 3, 4, 4), np.int32)}, "expects float32, got int32"),
    ({"x": np.zeros((2, 4, 4), np.float32)[None, None]}, "expects rank 4"),
    ({"x": np.zeros((2, 3, 4, 4), np.float32), "labels": np.zeros(3)}, "disagree"),
])
def test_bad_calibration_files(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=match):
        FileSource(tmp_path / "bad.npz", input_specs(IMG))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "nope.npz", IMG)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        open_source(tmp_path / "junk.npz", IMG)


def test_random_respects_dtypes_fixed_batch_and_seed():
    specs = input_specs(FIXED)
    a = [b.feeds for b in RandomSource(specs, 3, seed=1).batches(8)]
    b = [b.feeds for b in RandomSource(specs, 3, seed=1).batches(8)]
    assert len(a) == 3  # the model's batch dim is fixed at 1
    assert a[0]["ids"].dtype == np.int64 and a[0]["x"].shape == (1, 2)
    assert all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b))


def test_random_dynamic_dims():
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,C,L] x) => (float[N,C,L] y) { y = Relu(x) }""")
    (batch,) = list(RandomSource(input_specs(model), 2, dims={"L": 5}).batches(8))
    assert batch.feeds["x"].shape == (2, 32, 5)


def test_iterable_sources_reusable():
    data = [{"x": np.zeros((2, 3, 4, 4), np.float32)}, {"x": np.ones((1, 3, 4, 4), np.float32)}]
    gen = (d for d in data)
    src = IterableSource(gen, input_specs(IMG))
    assert src.count() == 3 and src.count() == 3  # one-shot iterator cached

    class Reader:  # onnxruntime's CalibrationDataReader shape
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    assert IterableSource(Reader(), input_specs(IMG)).count() == 3
    assert IterableSource(lambda: iter(data), input_specs(IMG)).count() == 3
    with pytest.raises(InputError, match="expected a dict"):
        IterableSource([np.zeros(3)], input_specs(IMG)).count()


def test_image_folder_with_classes(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 6), color).save(tmp_path / cls / "a.png")
    pre = parse_preprocess("size=4x4,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,order=BGR")
    src = open_source(tmp_path, IMG, preprocess=pre)
    assert isinstance(src, ImageFolderSource)
    (batch,) = list(src.batches(8))
    assert list(batch.labels) == [0, 1]
    x = batch.feeds["x"]
    assert x.shape == (2, 3, 4, 4)
    # red image in BGR order: channel 2 is 1.0, channels 0/1 are -1.0
    assert np.allclose(x[0, 2], 1.0) and np.allclose(x[0, 0], -1.0)


def test_preprocess_errors():
    with pytest.raises(InputError, match="unknown key"):
        parse_preprocess("colour=red")
    with pytest.raises(InputError):
        parse_preprocess("size=axb")
    with pytest.raises(InputError):
        parse_preprocess("layout=NWHC")


def test_parse_dims():
    assert parse_dims(["batch=4", "L=7"]) == {"batch": 4, "L": 7}
    for bad in ("batch", "batch=0", "batch=x"):
        with pytest.raises(InputError):
            parse_dims([bad])


def test_input_specs_skip_initializer_inputs():
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, float[2] w) => (float[2] y) { y = Add(x, w) }""")
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(2, np.float32), "w"))
    assert [s.name for s in input_specs(m)] == ["x"]


GRAY = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1,4,4] x) => (float[N,1,4,4] y) { y = Relu(x) }""")


@pytest.mark.parametrize("spec, message", [
    ("mean=0.5/0.5", "mean has 2 values; order=RGB gives 3 channels: give 1 or 3"),
    ("std=1/2/3/4", "std has 4 values"),
    ("order=L,mean=0.1/0.2/0.3", "mean has 3 values; order=L gives 1 channel"),
    ("std=0", "std 0.0 must be positive"),
    ("scale=-1", "scale=-1.0 must be a positive number"),
    ("size=0x4", "size 0x4 must be positive"),
    ("mean=nan", "mean nan must be finite"),
])
def test_preprocess_values_are_checked(tmp_path, spec, message):
    """Each bad value is a one-line InputError (it used to reach numpy as an internal error)."""
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        open_source(tmp_path, IMG, preprocess=parse_preprocess(spec))


def test_channel_count_mismatch_names_the_fix(tmp_path):
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="has 1 channels, order=RGB gives 3: add --preprocess order=L"):
        open_source(tmp_path, GRAY, preprocess=parse_preprocess(None))
    (batch,) = list(open_source(tmp_path, GRAY, preprocess=parse_preprocess("order=L")).batches(4))
    assert batch.feeds["x"].shape == (1, 1, 4, 4)


def test_channels_last_model_without_layout_names_layout_nhwc(tmp_path):
    nhwc = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,6,3] x) => (float[N,6,6,3] y) { y = Relu(x) }""")
    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="has 6 channels, order=RGB gives 3: add --preprocess layout=NHWC"):
        open_source(tmp_path, nhwc, preprocess=parse_preprocess(None))
    (batch,) = list(open_source(tmp_path, nhwc, preprocess=parse_preprocess("layout=NHWC")).batches(4))
    assert batch.feeds["x"].shape == (1, 6, 6, 3)


def test_bad_preprocess_is_exit_2_on_the_cli(tmp_path, capsys):
    from onnxcompress.cli import main

    Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "a.png")
    model = tmp_path / "img.onnx"
    onnx.save(IMG, model)
    code = main(["compare", str(model), str(model), "--data", str(tmp_path), "--preprocess", "size=4x4,mean=1/2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mean has 2 values" in err[0], err

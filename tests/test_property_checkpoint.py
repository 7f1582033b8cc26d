"""Property-based: hostile or damaged checkpoint files (random bytes, truncations, wrong structures,
pickles naming any global) give a CheckpointError, never a traceback from deep inside, never run code,
and `boxmask predict` on them exits 2 having written nothing."""
import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boxmask.cli import main
from boxmask.engine.checkpoint import CheckpointError, load_checkpoint

from .test_end_to_end import TINY

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GLOBALS = ["os system", "posix system", "builtins eval", "builtins exec", "subprocess Popen", "builtins getattr",
           "collections OrderedDict", "numpy.core.multiarray _reconstruct", "torch._utils _rebuild_tensor_v2",
           "builtins print", "boxmask.cli main"]


@pytest.fixture(scope="module")
def real_checkpoint(synth_data, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("pc") / "run"
    assert main(["train", "-c", "configs/tiny.yaml", *TINY, "--train-json", str(synth_data / "train.json"),
                 "--train-images", str(synth_data / "images"), "--out", str(out), "--max-iters", "1",
                 "--no-progress"]) == 0
    return (out / "model_0000001.pth").read_bytes()


def _pickle_calling(global_name: str, arg) -> bytes:
    """A protocol-2 pickle that calls ``module.name(arg)`` when loaded."""
    module, name = global_name.split()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + pickle.dumps((arg,), protocol=2)[2:-1]
            + b"R.")


def _expect_refused(path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "x.pth"
    path.write_bytes(data)
    _expect_refused(path)


@SETTINGS
@given(cut=st.floats(0.0, 0.999), flip=st.integers(0, 10**9))
def test_truncated_or_corrupted_real_checkpoints(tmp_path, real_checkpoint, cut, flip):
    data = bytearray(real_checkpoint[: int(len(real_checkpoint) * cut)])
    if data and flip % 2:
        data[flip % len(data)] ^= 0xFF
    path = tmp_path / "x.pth"
    path.write_bytes(bytes(data))
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return
    assert isinstance(state["model"], dict)  # a flipped byte inside tensor data can still load: as data


@SETTINGS
@given(global_name=st.sampled_from(GLOBALS), arg=st.one_of(st.text(max_size=20), st.integers()))
def test_pickles_naming_globals_never_run(tmp_path, global_name, arg):
    marker = tmp_path / "ran"
    payload = _pickle_calling(global_name, f"touch {marker}" if isinstance(arg, str) else arg)
    buf = io.BytesIO()
    torch.save({"model": {}, "config": {}}, buf)  # a zip-format checkpoint whose data.pkl is the payload
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, payload if item.filename.endswith("data.pkl") else src.read(item))
    try:
        load_checkpoint(path)
    except CheckpointError:
        pass
    else:  # only plain data can come back (e.g. an OrderedDict of nothing is refused as not a checkpoint)
        pytest.fail(f"{global_name} loaded")
    assert not marker.exists()


STRUCTURES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10)


@SETTINGS
@given(model=STRUCTURES, config=STRUCTURES, names=STRUCTURES)
def test_wrong_structures_are_clear_errors_in_predict(tmp_path, synth_data, capsys, model, config, names):
    path = tmp_path / "x.pth"
    torch.save({"model": model, "config": config, "class_names": names, "cat_ids": [1]}, path)
    out = tmp_path / "pred"
    rc = main(["predict", str(path), str(synth_data / "images" / "val_000000.png"), "--out", str(out),
               "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("boxmask: error: ") and "Traceback" not in err, err
    assert not out.exists()

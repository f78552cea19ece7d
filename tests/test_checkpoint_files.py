"""Weight files that are not checkpoints: one clear error from the one shared reader, whatever reads them."""
import pickle

import numpy as np
import pytest
import torch

from tprd.checkpoint import CheckpointFileError, read_checkpoint, read_weight_file
from tprd.checkpoint.merge import load_state_dict_file
from tprd.engine.checkpoint import DetectionCheckpointer


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(6.0)}, "iteration": 3}, path)
    return path


def test_formats_load_as_stored(tmp_path, good):
    assert set(read_weight_file(good)) == {"model", "iteration"}  # nothing unwrapped
    plain = tmp_path / "plain.pth"  # a plain pickle under a .pth name
    plain.write_bytes(pickle.dumps({"w": np.ones(2)}, protocol=2))
    assert np.array_equal(read_weight_file(plain)["w"], np.ones(2))
    as_pkl = tmp_path / "torchfile.pkl"  # a torch file under a .pkl name
    as_pkl.write_bytes(good.read_bytes())
    assert read_weight_file(as_pkl)["iteration"] == 3
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_weight_file(legacy)["w"], torch.ones(2))


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(50)}, legacy, _use_new_zipfile_serialization=False)
    return {
        "text": (_write(tmp_path / "notes.pth", b"hello, this is a text file\n" * 20), "neither a zip archive"),
        "text_pkl": (_write(tmp_path / "notes.pkl", b"\xb7 not utf-8 \xff\n" * 20), "neither a zip archive"),
        "empty": (_write(tmp_path / "empty.pth", b""), "empty file"),
        "cut_zip": (_write(tmp_path / "cut.pth", data[: len(data) // 2]), "truncated"),
        "cut_legacy": (_write(tmp_path / "cut_legacy.pth", legacy.read_bytes()[:200]), "truncated"),
        "not_a_dict": (_write(tmp_path / "list.pkl", pickle.dumps([1, 2, 3], protocol=2)), "holds a list"),
    }


@pytest.mark.parametrize("kind", ["text", "text_pkl", "empty", "cut_zip", "cut_legacy", "not_a_dict"])
def test_every_reader_names_the_file_and_its_first_bytes(tmp_path, good, kind):
    path, why = _bad_files(tmp_path, good)[kind]
    model = torch.nn.Linear(2, 3)
    readers = [read_weight_file, read_checkpoint, load_state_dict_file,
               lambda p: DetectionCheckpointer(model, "").load(str(p), checkpointables=[])]
    for read in readers:
        with pytest.raises(CheckpointFileError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path} is not a PyTorch checkpoint or pickle (")
        assert why in message
        assert message.endswith("expected a .pth/.pkl written by torch.save or detectron2")
        if kind != "empty":
            assert repr(path.read_bytes()[:16]) in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        read_weight_file(tmp_path / "nothere.pth")
    with pytest.raises(CheckpointFileError, match="is a folder"):
        read_weight_file(tmp_path)

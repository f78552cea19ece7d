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


def test_resume_from_a_damaged_last_checkpoint_names_it(tmp_path):
    (tmp_path / "model_0000009.pth").write_bytes(b"<html>502 Bad Gateway</html>")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointFileError, match=r"model_0000009.pth is not a PyTorch checkpoint or pickle \(starts with b'<html>"):
        DetectionCheckpointer(torch.nn.Linear(2, 3), str(tmp_path)).resume_or_load("", resume=True)


def _keys_only(names, classes=None):
    """A state dict with the given key names; ``class_embed[.0].weight`` gets ``classes`` rows."""
    return {k: torch.zeros(classes, 4) if classes and k.endswith("class_embed.0.weight") else torch.zeros(0)
            for k in names}


def test_describe_state_dict_names_what_a_checkpoint_is():
    import json

    from conftest import DETREX_KEYS_DIR
    from tprd.checkpoint import describe_state_dict

    def detrex(name, classes=80):
        return _keys_only([row[0] for row in json.loads((DETREX_KEYS_DIR / f"{name}.json").read_text())], classes)

    assert describe_state_dict(detrex("dino_r50_4scale")) == "a detrex DINO checkpoint with 80 classes"
    assert describe_state_dict(detrex("deformable_detr_r50", 91)) == "a detrex Deformable DETR checkpoint with 91 classes"
    assert describe_state_dict(detrex("deformable_detr_r50_two_stage")).startswith("a detrex Deformable DETR (two-stage)")
    dab = detrex("dab_detr_r50")
    dab["class_embed.weight"] = torch.zeros(80, 4)
    assert describe_state_dict(dab) == "a detrex DAB-DETR checkpoint with 80 classes"
    ours = _keys_only(["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "label_enc.weight",
                       "transformer.encoder.layers.0.self_attn.value_proj.weight", "class_embed.0.weight"], 5)
    assert describe_state_dict(ours) == "a TPRD (this toolbox's naming) DINO checkpoint with 5 classes"
    assert describe_state_dict(_keys_only(["student.backbone.conv1.weight", "teacher.label_enc.weight"])).startswith(
        "a distillation checkpoint (student and teacher keys")
    tv = _keys_only(["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"])
    assert describe_state_dict(tv) == "a backbone-only checkpoint (a ResNet in torchvision naming, 4 tensors)"
    assert describe_state_dict(_keys_only(["stem.conv1.weight", "res2.0.conv1.weight"])).startswith(
        "a backbone-only checkpoint (a ResNet in detectron2 naming")
    assert describe_state_dict(_keys_only(["a.b", "c"])) == "an unrecognised state dict of 2 tensors (first keys: a.b, c)"

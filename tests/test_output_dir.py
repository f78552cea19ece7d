"""``train.output_dir`` follows from the config's path when neither the config nor the command line
sets it (the folder ``train_distill.sh`` uses)."""
import subprocess
from pathlib import Path

from tprd.engine.main import default_output_dir, load_config

REPO = Path(__file__).resolve().parents[1]
KD_TPRD = REPO / "projects/dino/cfg_distill/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep.py"


def test_a_method_config_writes_where_train_distill_sh_says():
    assert load_config(str(KD_TPRD)).train.output_dir == "./output/dino/KD_DETR_TPRD/dino_r50_distill_r18_4scale_12ep"
    shell = subprocess.run(
        ["bash", "-c", 'CONFIG="$1"; PROJECT=$(echo "$CONFIG" | sed -E "s#^(.*projects/[^/]+)/.*#\\1#"); '
         'echo ./output/$(basename "$PROJECT")/$(basename "$(dirname "$CONFIG")")/$(basename "$CONFIG" .py)',
         "_", str(KD_TPRD)], capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == default_output_dir(str(KD_TPRD))


def test_the_command_line_and_the_config_win(tmp_path):
    assert load_config(str(KD_TPRD), [f"train.output_dir={tmp_path}"]).train.output_dir == str(tmp_path)
    detector = REPO / "projects/dino/configs/dino_r18_synthetic.py"
    assert load_config(str(detector)).train.output_dir == "./output/dino_r18_synthetic"
    outside = tmp_path / "my_config.py"
    outside.write_text("from tprd.config import get_config\n\ntrain = get_config('common/train.py').train\n")
    assert load_config(str(outside)).train.output_dir == "./output/my_config"

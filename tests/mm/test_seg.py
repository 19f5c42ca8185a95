"""UperNet (mmseg) on each family's smallest model: train a few iterations on the generated
ADE20K-format data with tools/train_seg.py's code, evaluate mIoU with mmseg's IoUMetric, resume,
test a checkpoint with tools/test_seg.py's code, and a 2-process torchrun run of tools/train_seg.py."""
import math
import subprocess
import sys

import pytest

pytest.importorskip("mmseg")

from tests.mm.conftest import ROOT, SMALLEST, TOOLS, seg_config, subprocess_env  # noqa: E402
from visionzoo.mm import runner  # noqa: E402


def assert_miou(value):
    value = float(value)  # numpy or Python scalars
    assert math.isfinite(value) and 0.0 <= value <= 100.0


@pytest.mark.parametrize("family", sorted(SMALLEST))
def test_upernet_trains_and_evaluates_miou(family, dense_data, tmp_path):
    config = seg_config(tmp_path / f"upernet_{family}.py", dense_data, SMALLEST[family], max_iters=2)
    work_dir = tmp_path / "work"
    trained = runner.train("seg", [str(config), "--work-dir", str(work_dir)])
    assert trained.iter == 2
    assert type(trained.model.backbone).__name__ in ("NAT", "DiNAT", "DiNATs")
    assert_miou(trained.message_hub.get_scalar("val/mIoU").current())
    if family != "nat":
        return
    # resume from the work dir's last checkpoint (weights-only loading), then evaluate it with the test tool
    resumed = runner.train("seg", [str(config), "--work-dir", str(work_dir), "--resume",
                                   "--cfg-options", "train_cfg.max_iters=3", "train_cfg.val_interval=3"])
    assert resumed.iter == 3
    metrics = runner.test("seg", [str(config), str(work_dir / "iter_2.pth"), "--work-dir", str(tmp_path / "test")])
    assert_miou(metrics["mIoU"])


def test_torchrun_two_processes(dense_data, tmp_path):
    config = seg_config(tmp_path / "upernet_torchrun.py", dense_data, SMALLEST["nat"], max_iters=2)
    work_dir = tmp_path / "work"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TOOLS / "train_seg.py"), str(config), "--launcher", "pytorch", "--work-dir", str(work_dir)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logs = "".join(path.read_text() for path in work_dir.glob("*/*.log"))
    assert "Distributed training: True" in logs and "Iter(train) [2/2]" in logs and "mIoU" in logs
    assert (work_dir / "iter_2.pth").is_file()

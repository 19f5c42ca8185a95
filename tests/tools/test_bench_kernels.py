"""tools/bench_kernels.py runs end to end and prints the comparison and tiling tables."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_kernels.py"), *args], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_quick_benchmark_prints_ratios_and_speed_of_light(tmp_path):
    plot = tmp_path / "perf.png"
    out = _run("--quick", "--skip", "flex", "reference", "--min-time", "0", "--max-runs", "2", "--plot", str(plot))
    rows = [line for line in out.splitlines() if line.startswith("| [1, 28x28, 2h, 32] k7x7 |")]
    methods = [row.split("|")[2].strip() for row in rows]
    assert methods[:5] == ["ours", "ours: cpu:window", "ours: torch:tiles", "gather", "sdpa+mask"]
    summary = [line for line in out.splitlines() if line.startswith("| [1, 28x28, 2h, 32] k7x7 | cpu:window |")]
    assert len(summary) == 1, "the summary names the path 'cpu' ran"
    assert "speed of light" in out and "tiled halo" in out
    assert plot.stat().st_size > 0


def test_tiling_only_covers_every_gpu_shape():
    out = _run("--tiling-only")
    for name in ("nat stage 1", "dinat stage 1", "large image", "video"):
        assert f"| {name} " in out

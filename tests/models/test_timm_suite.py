"""timm's own model tests (``tests/test_models.py``) over every registered ``visionzoo_*`` model.

timm's wheel does not ship its tests: the file is read from the source distribution of the
installed timm version, downloaded once from PyPI with pip into a cache directory
(``$XDG_CACHE_HOME/visionzoo`` or ``~/.cache/visionzoo``), and run in a separate pytest process
that loads visionzoo as a plugin (``-p visionzoo``) so that timm's model lists, built when the
file is collected, include our models. Nothing of timm's tests is kept in this repository.

Selected as timm's CI selects per marker, leaving out the tests that need pretrained weights
(downloads) or TorchScript (our attention ops are ``torch.library`` custom ops, which TorchScript
does not compile): the config and API-contract checks (on the meta device, cheap) for every
model, and forward, backward, feature extraction and FX forward / backward for the smallest
variant of each family (variants of a family differ only in depth and width; the full-size ones
would take tens of minutes on a CI machine). Everything, by hand, from the cache directory::

    python -m pytest tests/test_models.py -p visionzoo -k "visionzoo and not pretrained and not torchscript"
"""
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm

import visionzoo  # noqa: F401  (registers the models)
from tests.models.test_common import SMALLEST

# models whose forward_features returns a token sequence (class token first), as timm's own ViT and
# DeiT do: timm leaves those out of its default-cfg check by timm name (NON_STD_FILTERS), which our
# names do not match
SEQUENCE_OUTPUT = ("visionzoo_agent_deit", "visionzoo_vit_", "visionzoo_deit_")
# timm's ViT / DeiT with merged tokens: no feature maps (timm leaves its ViT / DeiT out of the
# feature-extraction check too, EXCLUDE_FEAT_FILTERS); tests/models/test_tome.py checks their features
MERGED_TOKENS = ("visionzoo_vit_", "visionzoo_deit_")
SELECTION = (
    f"visionzoo and not pretrained and not torchscript and (default_cfgs or {' or '.join(SMALLEST)})"
    f" and not (test_model_default_cfgs and ({' or '.join(SEQUENCE_OUTPUT)}))"
    f" and not (test_model_forward_features and ({' or '.join(MERGED_TOKENS)}))"
)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionzoo" / f"timm-{timm.__version__}"


def _timm_tests() -> Path:
    """``tests/test_models.py`` of the installed timm's sdist, extracted into the cache (downloaded once)."""
    root = _cache_dir()
    test_file = root / "tests" / "test_models.py"
    if test_file.is_file():
        return test_file
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as download:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary", ":all:",
             "--no-deps", "--quiet", "-d", download],
            capture_output=True, text=True, timeout=300,
        )
        archives = list(Path(download).glob("timm-*.tar.gz"))
        if result.returncode or not archives:
            pytest.skip(f"timm {timm.__version__}'s source distribution could not be downloaded from PyPI: "
                        f"{result.stderr.strip()[-500:]}")
        prefix = f"timm-{timm.__version__}/"
        with tarfile.open(archives[0]) as archive:
            # only the tests and the pytest config (markers): the installed timm is the one under test
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix + "tests/") or m.name == prefix + "pyproject.toml"]
            for member in members:
                member.name = member.name[len(prefix):]
            archive.extractall(root, members=members, filter="data")
    return test_file


def test_timm_model_tests_pass_for_every_visionzoo_model():
    test_file = _timm_tests()
    command = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "visionzoo", "-p", "no:cacheprovider",
               "-k", SELECTION, "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    result = subprocess.run(command, cwd=test_file.parent.parent, capture_output=True, text=True, timeout=1800)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    # at least a config check for every model and forward, backward and the two FX tests for the smallest
    assert passed and int(passed[1]) >= len(timm.list_models("visionzoo_*")) + 4 * len(SMALLEST), summary

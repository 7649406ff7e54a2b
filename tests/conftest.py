import os
import sys
from pathlib import Path

# No test touches the network: every model is built here and loaded from disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run through the CPU interpreter when there is no GPU; the flag is read when a
# kernel is defined, so it must be set before any project module imports triton.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny SD 1.x checkpoint in the hub layout (epsilon prediction)."""
    from tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from diffusion import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))

"""Where the app keeps its runtime data, relative to the checkout like FramePack's own folders."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "Cache"
OUTPUTS_DIR = REPO_ROOT / "outputs"

"""What the CLI and the app share at start-up: the model flags become settings, checked before anything loads."""

import argparse

import pytest

from diffusers_helper.acceleration.engine_cache import CACHE_DIR_VARIABLE
from diffusers_helper.frontend.startup import add_model_arguments, model_settings, runtime_for
from diffusers_helper.settings import InvalidSettings


def parsed(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(flags))


@pytest.mark.parametrize("flags, only_if_faster", [([], None), (["--enable-tensorrt"], True),
                                                   (["--enable-tensorrt", "--tensorrt-always"], False)])  # fmt: skip
def test_the_app_and_cli_runtime_serves_only_faster_engines_unless_told_always(flags, only_if_faster):
    runtime = runtime_for(model_settings(parsed(*flags)))
    assert (runtime and runtime.only_if_faster) == only_if_faster


def test_gpu_memory_to_preserve_is_a_model_setting():
    assert model_settings(parsed("--gpu-memory-preservation", "10")).gpu_memory_preservation == 10.0
    with pytest.raises(InvalidSettings, match=r"gpu_memory_preservation must be in \[0, 128\], got 200.0"):
        model_settings(parsed("--gpu-memory-preservation", "200"))


@pytest.mark.parametrize("flags", [["--backend", "compile"], ["--backend", "auto"], ["--enable-tensorrt"]])
def test_an_engine_cache_variable_naming_a_file_is_refused_at_start(flags, tmp_path, monkeypatch):
    """The compiled blocks' measurements and the engines live in the cache directory: a file there is refused before
    any model loads, not found out after."""
    (tmp_path / "engines").write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "engines"))
    with pytest.raises(InvalidSettings, match=f"{CACHE_DIR_VARIABLE} must name a directory"):
        model_settings(parsed(*flags))
    assert model_settings(parsed("--backend", "eager")).backend == "eager"  # nothing of it is used


INTERRUPTED_IMPORT = """
import builtins, runpy, sys
real_import = builtins.__import__

def import_until_ctrl_c(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise KeyboardInterrupt  # Ctrl-C while the heavy libraries import
    return real_import(name, *args, **kwargs)

builtins.__import__ = import_until_ctrl_c
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "command",
    [["generate.py", "--preset", "tiny", "--image", "x.png"], ["demo_gradio.py", "--preset", "tiny"],
     ["engines.py", "list"]],
    ids=["generate", "app", "engines"],
)  # fmt: skip
def test_ctrl_c_while_the_libraries_import_stops_in_one_line(command):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, *command], cwd=repo, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 130 and result.stderr == "stopped (Ctrl-C)\n", result.stderr[-2000:]

"""generate.py: validation with one-line errors and exit codes, and the README's tiny job end to end."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import generate

REPO = Path(__file__).resolve().parent.parent


def run_main(capsys, *args):
    code = generate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seconds", "0"], "error: seconds must be in (0, 120], got 0.0"),
        (["--seconds", "121"], "error: seconds must be in (0, 120], got 121.0"),
        (["--steps", "0"], "error: steps must be in [1, 100], got 0"),
        (["--steps", "101"], "error: steps must be in [1, 100], got 101"),
        (["--latent-window", "40"], "error: latent_window must be in [1, 33], got 40"),
        (["--resolution", "0"], "error: resolution must be in [128, 1280], got 0"),
        (["--magcache-threshold", "0"], "error: magcache_threshold must be in (0, 1], got 0.0"),
        (["--magcache-max-skips", "11"], "error: magcache_max_skips must be in [1, 10], got 11"),
        (["--magcache-retention", "-0.1"], "error: magcache_retention must be in [0, 1], got -0.1"),
        (["--end-strength", "2"], "error: end_strength must be in [0, 1], got 2.0"),
        (["--prompt-blend", "21"], "error: prompt_blend must be in [0, 20], got 21"),
        (["--prompt", "[0s: a] [2s-7s: b]"], "error: prompt timeline: [2s-7s: b] must end after it starts, by 5s"),
        (
            ["--variant", "f1", "--end-image", "e.png"],
            "error: --end-image needs the framepack variant: F1 generates "
            "forward from the start image, with no end frame to aim at",
        ),
        (["--end-image", "missing.png"], "error: end image not found: missing.png"),
    ],
)
def test_out_of_range_settings(capsys, image_file, tmp_path, extra, message):
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.mp4", *extra)
    assert code == 2
    assert err.strip() == message
    assert list(tmp_path.iterdir()) == []


def test_unknown_variant_and_preset_are_one_line_errors(capsys, image_file):
    for args, expected in (
        (["--variant", "sdxl"], "argument --variant: invalid choice: 'sdxl'"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--image", str(image_file), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err


@pytest.mark.parametrize(
    ("flags", "step_cache"),
    [
        ([], "teacache"),
        (["--teacache"], "teacache"),
        (["--no-teacache"], "off"),
        (["--step-cache", "magcache"], "magcache"),
        (["--step-cache", "off"], "off"),
        (["--step-cache", "teacache"], "teacache"),
    ],
)
def test_step_cache_flags_old_and_new(flags, step_cache):
    """--teacache/--no-teacache keep working beside --step-cache; MagCache's parameters reach the settings."""
    settings = generate.job_settings(generate.build_parser().parse_args(["--preset", "tiny", *flags]))
    assert settings.step_cache == step_cache
    magcache = ["--magcache-threshold", "0.2", "--magcache-max-skips", "3", "--magcache-retention", "0.3"]
    settings = generate.job_settings(generate.build_parser().parse_args([*flags, *magcache]))
    assert (settings.magcache_threshold, settings.magcache_max_skips, settings.magcache_retention) == (0.2, 3, 0.3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--step-cache", "fast"], "argument --step-cache: invalid choice: 'fast'"),
        (["--no-teacache", "--step-cache", "magcache"], "argument --step-cache: not allowed with argument --teacache"),
    ],
)
def test_a_bad_step_cache_choice_is_a_one_line_error(capsys, image_file, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--preset", "tiny", "--image", str(image_file), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_images(capsys, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tiny)
    (tmp_path / "photos").mkdir()
    cases = [
        (tmp_path / "missing.png", "error: image not found:"),
        (tmp_path / "photos", f"error: image is a directory, not a file: {tmp_path / 'photos'}"),
        (text, "error: not a readable image file:"),
        (tiny, "is 20x20; each side must be at least 64 pixels"),
    ]
    if Path("/dev/null").exists():  # a device: not a file to read an image from
        cases.append((Path("/dev/null"), "error: image is not a regular file: /dev/null"))
    for image, expected in cases:
        code, err = run_main(capsys, "--preset", "tiny", "--image", image, "--output", tmp_path / "out" / "x.mp4")
        assert code == 2, err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_directory(capsys, image_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", blocker / "sub" / "x.mp4")
    assert code == 2
    assert err.startswith("error: output directory not writable:") and err.count("\n") == 1


def test_output_must_be_mp4(capsys, image_file, tmp_path):
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.gif")
    assert code == 2 and "output must be an .mp4 file" in err


def test_missing_local_models_name_the_component_and_the_tiny_preset(capsys, image_file, tmp_path):
    (tmp_path / "models").mkdir()
    code, err = run_main(capsys, "--models", tmp_path / "models", "--image", image_file, "--output", tmp_path / "x.mp4")
    assert code == 1
    assert err.startswith("error: cannot load tokenizer from") and "--preset tiny" in err and err.count("\n") == 1
    code, err = run_main(
        capsys, "--models", tmp_path / "nowhere", "--image", image_file, "--output", tmp_path / "x.mp4"
    )
    assert code == 2 and "models directory not found" in err
    code, err = run_main(capsys, "--models", image_file, "--image", image_file, "--output", tmp_path / "x.mp4")
    assert code == 2 and err == f"error: models directory is not a directory: {image_file}\n"


@pytest.mark.subprocess
def test_unreachable_hub_is_one_clear_error(image_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "generate.py", "--image", str(image_file), "--output", str(tmp_path / "x.mp4")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hunyuanvideo-community/HunyuanVideo" in errors[0] and "--preset tiny" in errors[0]
    assert "Traceback" not in result.stderr


def test_help_gives_every_flag_a_text_and_its_default_and_ends_with_exit_codes_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = generate.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            if action.dest not in ("image", "tensorrt_info"):
                assert "default" in action.help, action.option_strings
    assert "exit codes:" in text and "130" in text and text.count("python generate.py") == 4
    output = next(action for action in parser._actions if action.dest == "output")
    assert "default: a new job name in --outputs" in output.help  # jobs are auto-named, not "none"


def test_tensorrt_flags_need_enable_tensorrt(capsys, image_file, tmp_path):
    code, err = run_main(
        capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.mp4", "--tensorrt-transformer"
    )
    assert code == 2
    assert err.strip() == "error: --tensorrt-transformer needs --enable-tensorrt"


def test_backend_compile_runs_the_job_and_says_what_the_blocks_ran_on(capsys, image_file, tmp_path):
    output = tmp_path / "x.mp4"
    flags = ("--seconds", "1", "--steps", "2", "--resolution", "128", "--backend", "compile")
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", output, *flags)
    assert code == 0 and err.strip().endswith("transformer blocks: torch.compile")
    assert json.loads(output.with_suffix(".json").read_text())["components"]["transformer"] == "torch.compile"


def test_fp8_without_an_fp8_gpu_makes_the_bf16_video_and_says_why(capsys, image_file, tmp_path):
    output = tmp_path / "x.mp4"
    flags = ("--seconds", "1", "--steps", "2", "--resolution", "128", "--fp8")
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", output, *flags)
    assert code == 0 and output.exists()
    reason = "FP8 not available: FP8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or Blackwell)"
    assert err.strip().endswith(f"transformer blocks: PyTorch; float32 ({reason}; this run is on the CPU)")


@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on machines without CUDA")
def test_tensorrt_without_a_gpu_falls_back_and_the_video_completes(image_file, tmp_path):
    output = tmp_path / "x.mp4"
    result = subprocess.run(
        [sys.executable, "generate.py", "--preset", "tiny", "--image", str(image_file), "--seconds", "1", "--steps", "3",
         "--output", str(output), "--enable-tensorrt", "--tensorrt-text-encoders", "--tensorrt-transformer"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "FRAMEPACK_TENSORRT_CACHE_DIR": str(tmp_path / "engines")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tensorrt: cannot run here: no CUDA GPU" in result.stderr
    assert "tensorrt: transformer: PyTorch (fell back: no CUDA GPU)" in result.stderr
    assert result.stderr.count("TensorRT cannot run here: no CUDA GPU; running vae_encoder, vae_decoder, ") == 1
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["components"]["transformer"] == "PyTorch (fell back: no CUDA GPU)"
    assert output.exists()


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1"])
def test_a_bad_engine_cache_size_is_one_line_naming_the_variable(capsys, image_file, tmp_path, monkeypatch, value):
    monkeypatch.setenv("FRAMEPACK_TENSORRT_CACHE_GB", value)
    for extra in (["--tensorrt-info"], ["--enable-tensorrt"]):
        code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.mp4", *extra)
        assert (
            code == 2 and err == f"error: FRAMEPACK_TENSORRT_CACHE_GB must be a positive number of GB, got {value!r}\n"
        )


@pytest.mark.subprocess
def test_the_readme_commands_run_as_written_and_make_the_tiny_video(tmp_path):
    """The README's set-up command, run in a scratch directory (its install step left out: the tests run installed),
    and the video, sidecar and terminal output it makes."""
    readme = (REPO / "README.md").read_text()
    command = next(
        line.strip() for line in readme.splitlines() if "generate.py --preset tiny --image example.png" in line
    )
    steps = command.split(" && ")[1:]  # after `pip install ...`
    python = f'"{sys.executable}" '  # the test's own interpreter: the one the set-up command installed into
    script = " && ".join(python + step.removeprefix("python ").replace("generate.py", str(REPO / "generate.py"))
                         for step in steps)  # fmt: skip
    result = subprocess.run(script, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    output = tmp_path / "outputs" / "example.mp4"
    with av.open(str(output)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 73
    # one line from each step: no blank lines, no library output
    assert result.stdout.splitlines() == ["example.png", "outputs/example.mp4: 73 frames"]
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["status"] == "complete" and record["preset"] == "tiny"
    tokens = 9 * (record["height"] // 8) * (record["width"] // 8) / 4  # window 9, 2 x 2 patches
    assert record["schedule"]["shift"] == pytest.approx(math.exp(0.5 + (tokens - 256) * 0.65 / 3840))
    assert output.with_suffix(".input.png").exists()
    # every log line starts a line of its own: none is glued onto the progress bar
    pieces = re.split(r"[\r\n]", result.stderr)
    assert all(piece.startswith(("INFO", "WARNING")) for piece in pieces if "diffusers_helper" in piece)
    assert any(piece.startswith("section 2/2 sampling") for piece in pieces)
    assert "loading models: tiny preset (random weights: expect noise)" in result.stderr
    assert (
        "models: framepack (lllyasviel/FramePackI2V_HY), tiny preset" in result.stderr
        and "cpu, float32" in result.stderr
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages on machines without CUDA")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "tiny", "--gpu-memory-limit", "8"], "error: --gpu-memory-limit needs a CUDA GPU, and PyTorch sees none"),
        (["--preset", "tiny", "--gpu-memory-limit", "-1"], "error: --gpu-memory-limit must be a positive number of GB, got -1.0"),
        (["--preset", "full-random"], "error: the full-random preset needs a CUDA GPU; on the CPU use --preset tiny"),
    ],
)  # fmt: skip
def test_gpu_only_settings_on_a_machine_without_one(capsys, image_file, tmp_path, extra, message):
    code, err = run_main(capsys, "--image", image_file, "--output", tmp_path / "x.mp4", *extra)
    assert code == 2 and err.strip() == message and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("missing.safetensors:0.5", "error: LoRA file not found: {tmp}/missing.safetensors"),
        (r"C:\loras\x.safetensors:0.5", r"error: LoRA file not found: C:\loras\x.safetensors"),
        ("x.safetensors:20", "error: LoRA scale must be in [-10, 10], got 20.0 for x.safetensors"),
        ("x.safetensors:abc", "error: --lora x.safetensors:abc: the scale 'abc' after the last colon is not a number"),
        ("{tmp}", "error: LoRA {tmp} is a directory, not a file"),
    ],
)
def test_a_bad_lora_is_refused_before_the_models_load(capsys, image_file, tmp_path, monkeypatch, lora, message):
    from diffusers_helper.frontend import startup

    monkeypatch.setattr(startup, "load_engine", lambda *args: pytest.fail("the models were loaded"))
    lora = lora.replace("missing", str(tmp_path / "missing")).format(tmp=tmp_path)
    code, err = run_main(
        capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.mp4", "--lora", lora
    )
    assert code == 2 and err == message.format(tmp=tmp_path) + "\n"
    assert not (tmp_path / "x.json").exists()


def test_a_lora_for_another_model_is_bad_input_and_writes_nothing(capsys, image_file, tmp_path):
    from tests.support.lora_files import random_layers, write_peft

    wan = write_peft(tmp_path / "wan.safetensors", random_layers({"blocks.0.self_attn.q": (32, 32)}, 4, 0))
    outputs = tmp_path / "out"
    code, err = run_main(
        capsys, "--preset", "tiny", "--image", image_file, "--output", outputs / "x.mp4", "--lora", wan
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: LoRA {wan} does not fit")
    assert list(outputs.iterdir()) == []


def test_the_sidecar_records_each_loras_name_scale_and_hash(capsys, image_file, tmp_path):
    import hashlib

    from tests.support.lora_files import TINY_LAYERS, random_layers, write_kohya, write_peft

    first = write_peft(tmp_path / "first.safetensors", random_layers(TINY_LAYERS, 4, 1))
    second = write_kohya(tmp_path / "second.safetensors", random_layers(TINY_LAYERS, 2, 2), alpha=1.0)
    output = tmp_path / "x.mp4"
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", output, "--seconds", "0.4",
                         "--latent-window", "3", "--steps", "1", "--lora", f"{first}:0.5", "--lora", second)  # fmt: skip
    assert code == 0, err
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["loras"] == [
        {"name": path.name, "path": str(path), "scale": scale, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path, scale in ((first, 0.5), (second, 1.0))
    ]


def test_a_lora_with_nan_weights_is_bad_input_and_writes_nothing(capsys, image_file, tmp_path):
    from tests.support.lora_files import TINY_LAYERS, random_layers, write_peft

    weights = random_layers(TINY_LAYERS, 4, 0)
    weights["proj_out"][1][0, 0] = float("nan")
    lora = write_peft(tmp_path / "nan.safetensors", weights)
    outputs = tmp_path / "out"
    code, err = run_main(
        capsys, "--preset", "tiny", "--image", image_file, "--output", outputs / "x.mp4", "--lora", lora
    )
    assert (
        code == 2
        and err.count("\n") == 1
        and err.startswith(f"error: LoRA {lora}: layer transformer.proj_out holds NaN")
    )
    assert not outputs.exists() or list(outputs.iterdir()) == []


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_a_prompt_that_is_not_utf8_is_bad_input_before_anything_is_written(capsys, image_file, tmp_path, flag):
    """A terminal that passes on bytes Python cannot decode gives the text "surrogate escapes" (here: byte 0xff)."""
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", tmp_path / "x.mp4",
                         flag, "a caf\udcff walks")  # fmt: skip
    name = flag.removeprefix("--").replace("-", "_")
    assert code == 2 and err == f"error: {name} is not valid UTF-8 text: it holds the byte 0xff at character 6\n"
    assert list(tmp_path.iterdir()) == []


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_a_job_rerun_from_its_json_makes_the_same_video_and_flags_override_single_values(capsys, image_file,
                                                                                          tmp_path, monkeypatch):  # fmt: skip
    """--from takes every setting of an earlier job (a timeline, a LoRA, the end image included) and its input image
    as used; a flag beside it overrides that one value. The frames compared are those the engine hands the MP4
    writer: libx264 was seen to encode identical frames differently from one job to the next in one process."""
    from PIL import Image

    from diffusers_helper.pipeline import engine

    written = {}

    def keep(frames, path, fps, crf):
        written[path.name] = frames.copy()
        engine_writer(frames, path, fps, crf)

    engine_writer = engine.write_mp4
    monkeypatch.setattr(engine, "write_mp4", keep)

    from diffusers_helper.media.images import example_image
    from tests.support.lora_files import TINY_LAYERS, random_layers, write_peft

    lora = write_peft(tmp_path / "style.safetensors", random_layers(TINY_LAYERS, 4, 1))
    Image.fromarray(example_image(200, 160)).save(tmp_path / "end.png")
    first = tmp_path / "first.mp4"
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", first, "--seconds", "0.8",
                         "--latent-window", "3", "--steps", "2", "--seed", "7", "--cfg-rescale", "0.3",
                         "--prompt", "[0s: a cat] [0.4s: a dog]", "--prompt-blend", "1", "--lora", f"{lora}:0.5",
                         "--end-image", tmp_path / "end.png", "--end-strength", "0.7")  # fmt: skip
    assert code == 0, err
    again = tmp_path / "again.mp4"
    code, err = run_main(capsys, "--preset", "tiny", "--from", first.with_suffix(".json"), "--output", again)
    assert code == 0, err
    recorded = [json.loads(path.with_suffix(".json").read_text()) for path in (first, again)]
    assert recorded[0]["settings"] == recorded[1]["settings"] and recorded[0]["loras"] == recorded[1]["loras"]
    np.testing.assert_array_equal(written["first.mp4"], written["again.mp4"])
    assert _frames(first).shape == _frames(again).shape
    other = tmp_path / "other.mp4"
    code, err = run_main(capsys, "--preset", "tiny", "--from", first.with_suffix(".json"), "--output", other,
                         "--seed", "8")  # fmt: skip
    assert code == 0, err
    settings = json.loads(other.with_suffix(".json").read_text())["settings"]
    assert settings == {**recorded[0]["settings"], "seed": 8}


@pytest.mark.parametrize("content", ["{not json", '{"settings": {}}'])
def test_from_a_file_that_is_not_a_jobs_json_is_one_line(capsys, tmp_path, content):
    (tmp_path / "job.json").write_text(content)
    code, err = run_main(capsys, "--preset", "tiny", "--from", tmp_path / "job.json")
    assert code == 2 and err.startswith(f"error: --from {tmp_path / 'job.json'}: not a job's JSON (")
    assert err.count("\n") == 1


def test_count_makes_videos_with_the_next_seeds(capsys, image_file, tmp_path):
    output = tmp_path / "x.mp4"
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--output", output, "--seconds", "0.4",
                         "--latent-window", "3", "--steps", "1", "--count", "2", "--seed", "5")  # fmt: skip
    assert code == 0, err
    seeds = [json.loads((tmp_path / name).read_text())["settings"]["seed"] for name in ("x.json", "x_2.json")]
    assert seeds == [5, 6] and not np.array_equal(_frames(output), _frames(tmp_path / "x_2.mp4"))
    code, err = run_main(capsys, "--preset", "tiny", "--image", image_file, "--count", "0")
    assert code == 2 and err == "error: --count must be 1 or more, got 0\n"

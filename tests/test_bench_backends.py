"""The all-backends benchmark and the section profile run end to end on the tiny preset (CPU)."""

import json

import pytest

from bench import backends, compile_options, profile_section


@pytest.mark.subprocess  # the bench runs each backend in a process of its own
def test_the_backends_bench_times_every_row_and_draws_the_chart(tmp_path):
    out = tmp_path / "out"
    flags = ["--preset", "tiny", "--device", "cpu", "--configs", "eager", "fp8", "--seconds", "1", "--steps", "4"]
    assert backends.main([*flags, "--runs", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "backends.jsonl").read_text().splitlines()]
    assert [row["config"] for row in rows] == [
        "eager", "eager, flash attention", "eager, efficient attention", "eager, cudnn attention",
        "eager, teacache 0.1", "eager, teacache 0.15", "eager, teacache 0.25", "eager, magcache 0.1", "fp8",
    ]  # fmt: skip
    eager = rows[0]
    for column in ("text_encoding_s", "image_encoding_s", "vae_encoding_s", "vae_decode_s_per_section",
                   "transformer_call_s", "s_per_step", "s_per_section", "video_s", "first_preview_s"):  # fmt: skip
        assert eager[column] > 0, column
    assert eager["transformer_tflop"] > 0 and eager["achieved_tflops"] > 0 and eager["sections"] == 1
    assert eager["backends"]["transformer"] == "PyTorch" and eager["preset"] == "tiny"
    assert "No viable backend" in rows[2]["error"]  # PyTorch has no efficient attention kernel on the CPU
    caches = [row["step_cache"] for row in rows[4:8]]
    assert all(cache["computed"] + cache["skipped"] == 4 for cache in caches)
    fp8 = rows[8]  # on the CPU FP8 falls back to bf16: the same output and video as eager's, compared through files
    assert "FP8 not available" in fp8["backends"]["transformer"]
    assert fp8["error_vs_eager"] == 0 and fp8["psnr_vs_eager_db"] == float("inf")
    assert (out / backends.REFERENCE).exists()
    table = (out / "backends.md").read_text()
    assert table.startswith("| backend | s_per_step |") and "| eager |" in table and "1.00x" in table
    assert (out / "backends.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_section_profile_groups_kernel_time_by_kind(tmp_path):
    flags = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--out", str(tmp_path), "--trace"]
    assert profile_section.main(flags) == 0
    result = json.loads((tmp_path / "profile.json").read_text())
    assert {"attention", "matrix multiplication", "convolution"} <= set(result["by_kind_s"])
    assert abs(sum(result["by_kind_s"].values()) - result["busy_s"]) < 1e-6 and result["section_wall_s"] > 0
    assert len(result["top_kernels"]) == profile_section.TOP
    assert (tmp_path / "profile.md").read_text().startswith("One section (2 steps, eager, cpu)")
    assert (tmp_path / "trace.json.gz").stat().st_size > 0


@pytest.mark.subprocess  # the bench runs each backend in a process of its own
def test_the_eager_process_times_only_the_extras_asked_for(tmp_path):
    flags = ["--preset", "tiny", "--device", "cpu", "--configs", "eager", "--seconds", "1", "--steps", "2"]
    assert backends.main([*flags, "--runs", "1", "--out", str(tmp_path), "--extras", "attention"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "backends.jsonl").read_text().splitlines()]
    assert [row["config"] for row in rows] == [
        "eager", "eager, flash attention", "eager, efficient attention", "eager, cudnn attention"
    ]  # fmt: skip


def test_the_tensorrt_rows_are_every_engine_always_and_the_default_fastest_path():
    from diffusers_helper.frontend.startup import runtime_for

    always, fastest = (backends.model_settings(config, "tiny", "cpu") for config in ("tensorrt", "fastest"))
    assert always.tensorrt == fastest.tensorrt and fastest.tensorrt.transformer and not fastest.tensorrt.always
    assert (always.backend, fastest.backend) == ("eager", "auto")  # the engines alone; the product's default
    assert runtime_for(fastest).only_if_faster


@pytest.mark.subprocess  # the bench runs each backend in a process of its own
def test_the_compile_row_runs_compiled_code_in_its_jobs_after_the_flops_are_counted(tmp_path):
    """Counting FLOPs under a dispatch mode must not leave torch.compile running eagerly: the jobs compile one graph
    per block class, and the prompt of another length after them runs those graphs (the text's length is dynamic)."""
    flags = ["--preset", "tiny", "--device", "cpu", "--configs", "compile", "--seconds", "1", "--steps", "2"]
    assert backends.main([*flags, "--runs", "1", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "backends.jsonl").read_text().splitlines()[0])
    assert row["backends"]["transformer"].startswith("torch.compile") and row["transformer_tflop"] > 0
    assert row["torch_compile"] == {"graphs": 2, "recompile_reasons": {}}
    assert row["new_prompt_first_step_s"] > 0


def test_the_compile_options_bench_times_each_option_set_against_eager_and_profiles_the_first(tmp_path):
    flags = ["--preset", "tiny", "--device", "cpu", "--options", "default", "coordinate_descent", "--runs", "1"]
    assert compile_options.main([*flags, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compile_options.json").read_text())
    eager, *compiled = result["rows"]
    assert eager["options"] == "eager" and [row["options"] for row in compiled] == ["default", "coordinate_descent"]
    for row in compiled:
        assert row["compiled"] == "torch.compile" and row["speedup"] > 0 and row["first_call_s"] > 0
        assert 0 < row["error_vs_eager"] < 1e-3  # compiled for real (not eager's output), and right
    profiled = result["profile"]
    assert profiled["options"] == "default" and "attention" in profiled["by_kind_s"]
    assert abs(sum(profiled["by_kind_s"].values()) - profiled["busy_s"]) < 1e-6
    assert "| coordinate_descent |" in (tmp_path / "compile_options.md").read_text()

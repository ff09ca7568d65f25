"""`--gpus`: one pass of the transformer split over processes (context parallelism) gives the single process's
output, with the step caches deciding alike on every rank; here two CPU processes over gloo, the tiny preset."""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import generate
from diffusers_helper.acceleration.measure import psnr, relative_error
from diffusers_helper.media.images import example_image
from diffusers_helper.media.video import read_video
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.parallel import launch
from diffusers_helper.parallel.context_parallel import enable_context_parallel, split_plan
from diffusers_helper.parallel.launch import TORCHRUN_VARIABLES, ranks_joined, torchrun_command
from diffusers_helper.settings import InvalidSettings, ModelSettings, TensorRTOptions
from tests.support import parallel_worker

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(ranks: int, teacache: float | None) -> list[tuple]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=parallel_worker.run_rank, args=(rank, ranks, port, teacache, results))
                 for rank in range(ranks)]  # fmt: skip
    for process in processes:
        process.start()
    outputs = sorted((results.get(timeout=600) for _ in processes), key=lambda output: output[0])
    for process in processes:
        process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes)
    return [(rank, torch.from_numpy(latents), *counts) for rank, latents, *counts in outputs]


@pytest.mark.parametrize("teacache", [None, 0.3], ids=["every step", "teacache"])
def test_two_processes_sample_the_single_process_section(teacache):
    single = parallel_worker.assembled(1, teacache)
    expected = parallel_worker.section(single)
    outputs = run_ranks(2, teacache)
    (_, first, computed, skipped), (_, second, *counts) = outputs
    print(
        f"2 ranks against 1: relative error {relative_error(first, expected):.2e}; "
        f"computed {computed}, skipped {skipped}"
    )
    assert torch.equal(first, second)  # every rank ends with the gathered output
    assert relative_error(first, expected) < 1e-5  # float32: the attention's sums in another order
    assert [computed, skipped] == counts == [single.teacache.computed, single.teacache.skipped]
    assert skipped > 0 if teacache else skipped == 0


def test_the_plan_splits_the_first_blocks_inputs_and_every_blocks_rotary_embedding(tiny_root):
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory

    transformer = load_components("framepack", tiny_root, plan_memory("cpu").dtypes()).transformer
    plan, blocks = split_plan(transformer), transformer_blocks(transformer)
    assert len(plan) == len(blocks)
    assert set(plan["transformer_blocks.0"]) == {"hidden_states", "encoder_hidden_states", "freqs_cis"}
    assert set(plan["transformer_blocks.1"]) == {"freqs_cis"} and set(plan["single_transformer_blocks.0"]) == {
        "image_rotary_emb"
    }


def test_gpus_without_the_processes_to_match_is_one_line(tiny_root):
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory

    transformer = load_components("framepack", tiny_root, plan_memory("cpu").dtypes()).transformer
    with pytest.raises(
        InvalidSettings, match="--gpus 2 needs 2 processes, one per GPU, and 1 started: run it with torchrun"
    ):
        enable_context_parallel(transformer, 2)


def test_gpus_is_refused_with_the_tensorrt_transformer_and_below_one():
    with pytest.raises(InvalidSettings, match="a TensorRT engine runs whole passes"):
        ModelSettings(gpus=2, tensorrt=TensorRTOptions(transformer=True))
    with pytest.raises(InvalidSettings, match="--gpus must be a whole number of at least 1, got 0"):
        ModelSettings(gpus=0)


# -- the CLI's launch: `generate.py --gpus N` ------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages on machines without CUDA")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpus", "2"], "error: --gpus 2 needs 2 CUDA GPUs; this machine has 0"),
        (["--gpus", "2", "--device", "cpu"], "error: --gpus 2 splits the transformer over CUDA GPUs; --device is cpu"),
        (["--gpus", "0"], "error: --gpus must be a whole number of at least 1, got 0"),
    ],
)
def test_gpus_that_are_not_there_are_one_line_and_nothing_is_written(capsys, image_file, tmp_path, extra, message):
    code = generate.main(["--preset", "tiny", "--image", str(image_file), "--output", str(tmp_path / "x.mp4"), *extra])
    assert code == 2 and capsys.readouterr().err.strip() == message and list(tmp_path.iterdir()) == []


def test_gpus_starts_one_process_per_gpu_through_torchrun_with_the_same_flags(image_file, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launch.subprocess, "call", lambda command: started.append(command) or 0)
    for variable in TORCHRUN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    argv = ["--preset", "tiny", "--image", str(image_file), "--output", str(tmp_path / "x.mp4"), "--gpus", "2"]
    assert generate.main(argv) == 0
    assert started == [torchrun_command(generate.__file__, argv, 2)]
    assert started[0][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert list(tmp_path.iterdir()) == []  # the ranks write, not the launcher


def test_a_rank_joins_only_as_many_processes_as_gpus_asks_for(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(InvalidSettings, match="--gpus 2 runs one process per GPU, and torchrun started 3"):
        with ranks_joined(ModelSettings(gpus=2)):
            pass
    with ranks_joined(ModelSettings()) as rank:  # one GPU: no process group
        assert rank == 0 and not torch.distributed.is_initialized()


def test_the_first_rank_writes_the_job_and_the_others_into_scratch_that_goes(tmp_path):
    args = argparse.Namespace(outputs=tmp_path, output=tmp_path / "x.mp4")
    with generate._outputs_of_rank(args, 0):
        assert (args.outputs, args.output) == (tmp_path, tmp_path / "x.mp4")
    with generate._outputs_of_rank(args, 1):
        scratch = args.outputs
        assert args.output is None and scratch != tmp_path and scratch.is_dir()
    assert not scratch.exists()


@pytest.mark.subprocess
def test_a_cli_job_on_two_ranks_makes_the_one_process_video_and_writes_it_once(tmp_path):
    """What torchrun starts for `--gpus 2`, here two CPU processes over gloo (tests/support/cpu_ranks.py): the first
    writes the job's video, which is one process's video; the second leaves nothing behind. A square start image: its
    bucket packs an even number of latent tokens, which gloo gathers (it cannot gather shards of uneven length). The
    MP4s are lossless (`--crf 0`): the tiny preset's noise, encoded lossily, turns float32 rounding into a few dB."""
    image_file = tmp_path / "start.png"
    Image.fromarray(example_image(128, 128)).save(image_file)
    job = ["--preset", "tiny", "--device", "cpu", "--image", str(image_file), "--prompt", "a cat walks",
           "--seconds", "1", "--steps", "4", "--seed", "5", "--crf", "0"]  # fmt: skip
    single = tmp_path / "single" / "video.mp4"
    assert generate.main([*job, "--output", str(single)]) == 0
    split = tmp_path / "split" / "video.mp4"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "support" / "cpu_ranks.py"), "generate", *job, "--gpus", "2", "--output", str(split)]  # fmt: skip
    scratch_before = set(Path(tempfile.gettempdir()).glob("framepack-rank*"))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in split.parent.iterdir()) == sorted(p.name for p in single.parent.iterdir())
    frames = [read_video(path, 30, 1000, lambda frame: frame)[0] for path in (single, split)]
    assert frames[0].shape == frames[1].shape and psnr(frames[1], frames[0]) > 60
    assert set(Path(tempfile.gettempdir()).glob("framepack-rank*")) == scratch_before
    assert result.stdout.count("video.mp4") == 1  # one rank reports the job


@pytest.mark.subprocess
def test_the_app_on_two_ranks_runs_a_queued_job_as_one_process_would_and_closes_them_all(tmp_path):
    """`demo_gradio.py --gpus 2` as torchrun runs it, on two CPU processes: the first rank serves the page and the
    queue and hands each job to the second, which runs it beside it; a SIGTERM to torchrun closes both."""
    import jobs
    from diffusers_helper.jobs.store import JobState, JobStore

    image_file = tmp_path / "start.png"
    Image.fromarray(example_image(128, 128)).save(image_file)
    job = ["--preset", "tiny", "--image", str(image_file), "--prompt", "a cat walks", "--seconds", "1", "--steps",
           "4", "--seed", "5", "--crf", "0"]  # fmt: skip
    single = tmp_path / "single" / "video.mp4"
    assert generate.main([*job, "--device", "cpu", "--output", str(single)]) == 0
    store = tmp_path / "jobs.sqlite3"
    assert jobs.main(["--jobs-db", str(store), "add", *job, "--outputs", str(tmp_path / "app")]) == 0
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "support" / "cpu_ranks.py"), "demo_gradio", "--preset", "tiny", "--device", "cpu",
               "--gpus", "2", "--port", str(port), "--jobs-db", str(store), "--outputs", str(tmp_path / "app")]  # fmt: skip
    log = tmp_path / "app.log"
    with open(log, "w") as output:
        app = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while JobStore(store).get(1).state in (JobState.QUEUED, JobState.RUNNING):
            assert app.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        app.terminate()
        app.wait(timeout=120)
    done = JobStore(store).get(1)
    assert done.state == JobState.DONE, (done.error, log.read_text()[-3000:])
    frames = [read_video(path, 30, 1000, lambda frame: frame)[0] for path in (single, done.video)]
    print(f"the app's job on two ranks against one process: PSNR {psnr(frames[1], frames[0]):.1f} dB")
    assert frames[0].shape == frames[1].shape and psnr(frames[1], frames[0]) > 60


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages on machines without CUDA")
def test_the_apps_gpus_that_are_not_there_or_with_workers_are_one_line(capsys, monkeypatch, tmp_path):
    import demo_gradio

    base = ["--preset", "tiny", "--outputs", str(tmp_path), "--port", str(free_port())]
    assert demo_gradio.main([*base, "--gpus", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus 2 needs 2 CUDA GPUs; this machine has 0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert demo_gradio.main([*base, "--gpus", "2", "--workers", "2"]) == 2
    message = "error: --gpus runs each job over several GPUs, --workers several jobs at once: pick one"
    assert capsys.readouterr().err.strip() == message

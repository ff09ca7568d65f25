"""A job's files belong to the user: the input is never overwritten, an earlier job is replaced only when asked (and
then as a whole), a bad output path is found before any work is done, and a stopped or interrupted job leaves its
video so far, a JSON that says "stopped" and no temporary files."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

import generate

REPO = Path(__file__).resolve().parent.parent
TINY_JOB = ["--preset", "tiny", "--prompt", "a cat walks", "--steps", "2", "--seconds", "1"]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals")


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "generate.py", *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(".") or path.suffix == ".tmp")


def in_process(capsys, *args) -> tuple[int, str]:
    """generate.py's main in this process: (exit code, stderr)."""
    code = generate.main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def test_the_input_photo_is_never_overwritten(capsys, image_file, tmp_path):
    photo = tmp_path / "cat.png"
    shutil.copy(image_file, photo)
    before = photo.read_bytes()
    code, err = in_process(capsys, *TINY_JOB, "--image", photo, "--output", tmp_path / "cat.mp4")
    assert code == 0, err[-2000:]
    assert photo.read_bytes() == before
    assert (tmp_path / "cat.input.png").exists() and (tmp_path / "cat.json").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_input_that_would_be_the_saved_input_is_refused(capsys, image_file, tmp_path, overwrite):
    photo = tmp_path / "cat.input.png"
    shutil.copy(image_file, photo)
    before = photo.read_bytes()
    code, err = in_process(capsys, *TINY_JOB, "--image", photo, "--output", tmp_path / "cat.mp4", *overwrite)
    assert code == 2 and err.strip().endswith("is an input of the job; choose another --output")
    assert photo.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cat.input.png"]


def test_an_earlier_job_is_replaced_only_when_asked(capsys, image_file, tmp_path):
    output = tmp_path / "job.mp4"
    assert in_process(capsys, *TINY_JOB, "--image", image_file, "--output", output)[0] == 0
    stamps = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    code, err = in_process(capsys, *TINY_JOB, "--image", image_file, "--output", output)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert err.count("\n") == 1  # refused before any work
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == stamps
    code, err = in_process(capsys, *TINY_JOB, "--image", image_file, "--output", output, "--overwrite", "--seed", "7")
    assert code == 0, err[-2000:]
    assert json.loads(output.with_suffix(".json").read_text())["settings"]["seed"] == 7


def test_an_output_that_is_a_directory_is_refused_before_any_work(capsys, image_file, tmp_path):
    (tmp_path / "out.mp4").mkdir()
    code, err = in_process(capsys, *TINY_JOB, "--image", image_file, "--output", tmp_path / "out.mp4")
    assert code == 2 and err.strip() == f"error: output {tmp_path / 'out.mp4'} is a directory"


@pytest.mark.subprocess
@pytest.mark.parametrize("verbose", [False, True])
def test_a_failure_is_one_line_with_the_traceback_only_when_verbose(image_file, tmp_path, verbose):
    script = (
        "import sys, generate\n"
        "from diffusers_helper.pipeline.engine import FramePackEngine\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('kernel exploded')\n"
        "    yield\n"
        "FramePackEngine._generate = broken\n"
        "sys.exit(generate.main(sys.argv[1:]))\n"
    )
    args = [*TINY_JOB, "--image", str(image_file), "--output", str(tmp_path / "x.mp4")] + (["--verbose"] * verbose)
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 1
    assert "error: RuntimeError: kernel exploded" in result.stderr
    assert ("Traceback" in result.stderr) == verbose
    assert json.loads((tmp_path / "x.json").read_text())["status"] == "failed"


def _start_job(image_file: Path, output: Path) -> subprocess.Popen:
    command = [sys.executable, "generate.py", "--preset", "tiny", "--prompt", "a cat walks", "--steps", "12",
               "--seconds", "4", "--image", str(image_file), "--output", str(output)]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_section(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    for line in process.stderr:
        if "section 1/3 done" in line:
            return
        assert time.monotonic() < deadline and process.poll() is None, line
    raise AssertionError(f"the job ended early with {process.wait()}")


@pytest.mark.subprocess
@posix_only
@pytest.mark.parametrize(
    ("signals", "code"),
    [([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)],
    ids=["sigterm", "ctrl-c-twice"],
)
def test_a_signalled_job_keeps_its_video_and_says_stopped(image_file, tmp_path, signals, code):
    output = tmp_path / "job.mp4"
    process = _start_job(image_file, output)
    _wait_for_first_section(process)
    for signum in signals:
        process.send_signal(signum)
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["status"] == "stopped" and record["sections_done"] >= 1
    with av.open(str(output)) as container:
        assert sum(1 for _ in container.decode(video=0)) == record["frames"] >= 33
    assert leftovers(tmp_path) == []
    if len(signals) == 1:  # stopped after the step that was running: the video so far, said on stdout
        assert stdout.strip().endswith(f"stopped after {record['sections_done']} of 3 sections")


@pytest.mark.subprocess
@posix_only
def test_sigterm_while_the_models_load_writes_nothing(image_file, tmp_path):
    output = tmp_path / "early.mp4"
    process = _start_job(image_file, output)
    for line in process.stderr:
        if "loading models" in line:
            break
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=240)
    assert process.returncode == 143
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_are_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = capsys.readouterr().out
    for code in (0, 1, 2, 130, 143):
        assert re.search(rf"^ +{code} +[a-z]", text, re.MULTILINE), code


def test_an_output_name_too_long_for_the_file_system_is_refused_in_one_line(capsys, image_file, tmp_path):
    output = tmp_path / ("x" * 250 + ".mp4")  # the name fits most file systems; the names written first do not
    code = generate.main(["--preset", "tiny", "--image", str(image_file), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: output {output} cannot be written (")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []

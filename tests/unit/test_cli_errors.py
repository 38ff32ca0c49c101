"""Every common mistake with the command line ends in one line on stderr and a non-zero exit code, never a
traceback. The real ``tcsched`` console script runs in a subprocess; nothing listens on the ports
used unless the test starts it (a plain HTTP server that is not Triton stands for "a wrong port")."""

import http.server
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tcsched.server import free_port
from tests.conftest import SHARED
from tests.helpers import make_manifest

TCSCHED = Path(sys.executable).parent / "tcsched"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TCSCHED), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a failed command, checked: non-zero exit, no traceback, each needle in it."""
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    (line,) = lines
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A folder with a manifest (what `tcsched eval` reads before it sends anything)."""
    d = tmp_path_factory.mktemp("repo")
    make_manifest(
        {"mobilenet_v2_fp32": ("fp32", 0.0, {1: 5.0}), "mobilenet_v2_int8": ("int8", 0.8, {1: 3.0})}
    ).write(d / "manifest.json")
    return d


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """A labeled folder (labels.csv) with one real JPEG from the shared sample, else a tiny PNG."""
    d = tmp_path_factory.mktemp("labeled")
    jpgs = sorted(SHARED.glob("*.JPEG"))[:1] if SHARED.is_dir() else []
    if jpgs:
        (d / "a.jpg").write_bytes(jpgs[0].read_bytes())
    else:
        from PIL import Image

        Image.new("RGB", (32, 32), (120, 30, 200)).save(d / "a.jpg", format="JPEG")
    (d / "labels.csv").write_text("file,class_index\na.jpg,0\n")
    return d


@pytest.fixture(scope="module")
def not_triton() -> str:
    """host:port of a plain HTTP server (every path 404): a port where something else listens."""
    httpd = socketserver.TCPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_eval_with_the_server_down(repo, labeled):
    port = free_port()
    one_line_error(
        run_cli("eval", labeled, "--repo", repo, "--url", f"127.0.0.1:{port}", "--no-reference"),
        "no Triton server answers",
        f"127.0.0.1:{port}",
    )


def test_eval_on_a_wrong_port(repo, labeled, not_triton):
    one_line_error(
        run_cli("eval", labeled, "--repo", repo, "--url", not_triton, "--no-reference"), not_triton
    )


def test_eval_with_an_unknown_variant(repo, labeled):
    one_line_error(
        run_cli("eval", labeled, "--repo", repo, "--variants", "int9", "--no-reference"),
        "--variants",
        "unknown variant 'int9'",
        "mobilenet_v2_int8",
    )


def test_eval_with_url_but_no_repository(labeled, tmp_path):
    one_line_error(
        run_cli("eval", labeled, "--url", f"127.0.0.1:{free_port()}", cwd=tmp_path),
        "no manifest.json in model_repository",
        "--repo",
    )


def test_eval_of_a_folder_that_is_not_there(repo, tmp_path):
    one_line_error(run_cli("eval", tmp_path / "nope", "--repo", repo), "does not exist")


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}", "http://127.0.0.1:{port}/"])
def test_classify_with_a_scheme_in_the_url_only_finds_the_server_down(labeled, url):
    port = free_port()
    line = one_line_error(
        run_cli("classify", labeled / "a.jpg", "--url", url.format(port=port)), "no Triton server answers"
    )
    assert "scheme" not in line and f"127.0.0.1:{port} (http)" in line


def test_classify_with_an_unknown_protocol(labeled):
    one_line_error(run_cli("classify", labeled / "a.jpg", "--protocol", "foo"), "--protocol", "'foo'")


def test_classify_over_grpc_defaults_to_the_grpc_port(labeled):
    # nothing listens on 8001 on the test machine; the point is the port the message names
    line = one_line_error(run_cli("classify", labeled / "a.jpg", "--protocol", "grpc"))
    assert "127.0.0.1:8001 (grpc)" in line


def test_classify_of_a_folder_without_images(tmp_path):
    one_line_error(run_cli("classify", tmp_path), "no images", str(tmp_path))


def test_classify_of_a_folder_takes_its_images(labeled):
    # the folder is accepted (its image is read); the failure is then the missing server
    one_line_error(
        run_cli("classify", labeled, "--url", f"127.0.0.1:{free_port()}"), "no Triton server answers"
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["classify", "missing.jpg"], ["no such file or folder: missing.jpg"]),
        (["classify", "{img}", "--url", "https://h:1"], ["unsupported scheme"]),
        (["classify", "{img}", "--url", "h:port"], ["not a number"]),
        (["classify", "{img}", "--top-k", "0"], ["--top-k"]),
        (["classify", "{img}", "--latency-budget-ms", "-5"], ["must be > 0"]),
        (["classify", "{img}", "--objective", "fastest"], ["--objective"]),
        (["eval", "{dir}", "--min-agreement", "1.5", "--repo", "{repo}"], ["--min-agreement"]),
        (["serve", "--", "--http-port=9"], ["--http-port is set by tcsched serve"]),
        (["serve", "--", "--http-restricted-api=health:k=v"], ["--open-api and --admin-key"]),
        (["serve", "--log-info=true"], ["tritonserver options go after --"]),
        (["serve", "--repo", "{dir}"], ["not a tcsched model repository"]),
        (["perf-data", "{dir}"], ["--output"]),
        (["build", "--pixels", "int4"], ["--pixels must be 'uint8' or 'float32'", "'int4'"]),
        (["build", "--pixels", "uint8", "--target", "gpu"], ["--target gpu needs --pixels float32"]),
        (["nosuchcommand"], ["No such command"]),
    ],
)
def test_usage_mistakes(args, needles, labeled, repo):
    fmt = {"img": labeled / "a.jpg", "dir": labeled, "repo": repo}
    one_line_error(run_cli(*[a.format(**fmt) for a in args]), *needles)


def test_version_and_help_exit_zero():
    from tcsched import __version__

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tcsched {__version__}"
    assert run_cli("classify", "--help").returncode == 0


def test_build_pixels_default_uint8_and_float32_for_the_gpu():
    import typer

    from tcsched.build_tools.repository import ServingOptions
    from tcsched.cli.build_cmd import pixels_for

    assert ServingOptions().pixels == "uint8" and pixels_for("cpu", None) == "uint8"
    assert pixels_for("gpu", None) == "float32" and pixels_for("cpu", "float32") == "float32"
    with pytest.raises(typer.BadParameter, match="--target gpu needs --pixels float32"):
        pixels_for("gpu", "uint8")

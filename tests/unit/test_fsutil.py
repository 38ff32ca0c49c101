"""The build's output folder: a foreign folder is refused before any work, a tcsched repository is replaced,
and the written tree gets the permissions mkdir/open give under the umask."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tcsched.fsutil import OutputFolderError, atomic_directory, check_replaceable_output

TEMPLATE_README = (
    Path(__file__).resolve().parents[2] / "build_tools" / "templates" / "model_repository_README.md"
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def foreign(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "precious.txt").write_text("irreplaceable")
    (d / "sub").mkdir()
    return d


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it (pytest runs tests in one thread)."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_to(mask: int) -> None:
        os.umask(mask)

    yield set_to
    os.umask(saved)


def test_foreign_folder_is_refused_and_left_intact(foreign):
    with pytest.raises(OutputFolderError) as e:
        check_replaceable_output(foreign)
    msg = str(e.value)
    assert str(foreign) in msg and "precious.txt" in msg and "sub" in msg and "2 entries" in msg
    assert "no manifest.json" in msg and "choose another output folder" in msg
    assert (foreign / "precious.txt").read_text() == "irreplaceable"


@pytest.mark.parametrize(
    "manifest,why",
    [
        ('{"name": "My PWA", "start_url": "/"}', "is not a tcsched manifest"),  # a web app's manifest.json
        ("{not json", "does not parse"),
        ("[1, 2]", "is not a tcsched manifest"),
    ],
)
def test_a_manifest_json_that_is_not_tcsched_does_not_make_a_repository(foreign, manifest, why):
    (foreign / "manifest.json").write_text(manifest)
    with pytest.raises(OutputFolderError, match=why):
        check_replaceable_output(foreign)
    assert (foreign / "precious.txt").read_text() == "irreplaceable"


def test_a_file_or_dangling_link_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        check_replaceable_output(f)
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputFolderError, match="dangling"):
        check_replaceable_output(link)
    assert f.read_text() == "x"


def test_absent_empty_placeholder_and_tcsched_repositories_are_replaceable(tmp_path):
    check_replaceable_output(tmp_path / "new")  # absent
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "empty").mkdir()
    check_replaceable_output(tmp_path / "empty")
    placeholder = tmp_path / "model_repository"  # what git tracks: only the README
    placeholder.mkdir()
    (placeholder / "README.md").write_text(TEMPLATE_README.read_text())
    check_replaceable_output(placeholder)
    other_readme = tmp_path / "docs"
    other_readme.mkdir()
    (other_readme / "README.md").write_text("# my notes\n")
    with pytest.raises(OutputFolderError, match="README.md"):
        check_replaceable_output(other_readme)


def test_existing_tcsched_repository_is_replaced(tmp_path):
    repo = tmp_path / "model_repository"
    (repo / "mobilenet_v2_fp32" / "1").mkdir(parents=True)
    (repo / "manifest.json").write_text(json.dumps({"schema_version": "0.9", "variants": [], "other": 1}))
    (repo / "stale.txt").write_text("old build")
    check_replaceable_output(repo)  # any schema version: an old repository is rebuilt
    with atomic_directory(repo) as d:
        (d / "manifest.json").write_text(json.dumps({"schema_version": "1.0", "variants": []}))
    assert sorted(p.name for p in repo.iterdir()) == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model_repository"]


def test_build_refuses_a_foreign_output_before_any_work(foreign, tmp_path):
    from tcsched.build_tools.build import BuildConfig, build

    work = tmp_path / "work"
    with pytest.raises(OutputFolderError, match="precious.txt"):
        build(BuildConfig(output=foreign, work_dir=work, report_dir=tmp_path / "reports"))
    assert not work.exists() and not (tmp_path / "reports").exists()  # nothing started
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt", "sub"]
    assert (foreign / "precious.txt").read_text() == "irreplaceable"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries


def test_build_cli_refusal_is_a_usage_error(foreign):
    r = subprocess.run(
        [sys.executable, "-m", "tcsched.cli", "build", "--output", str(foreign)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing to replace" in r.stderr and "precious.txt" in r.stderr
    assert (foreign / "precious.txt").read_text() == "irreplaceable"


@pytest.mark.parametrize(
    "mask,dirs,files,execs", [(0o022, 0o755, 0o644, 0o755), (0o027, 0o750, 0o640, 0o750)]
)
def test_written_tree_gets_mkdir_and_open_permissions_under_the_umask(
    tmp_path, umask, mask, dirs, files, execs
):
    umask(mask)
    target = tmp_path / "repo"
    with atomic_directory(target) as d:
        sub = Path(tempfile.mkdtemp(dir=d))  # 0700, as tempfile makes them
        fd, private = tempfile.mkstemp(dir=sub)  # 0600
        os.close(fd)
        tool = d / "run.sh"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o700)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".json")  # Manifest.write's atomic write: 0600
        with os.fdopen(fd, "w") as f:
            f.write("{}")
        os.replace(tmp, d / "manifest.json")
        (d / "link").symlink_to("manifest.json")
    assert _mode(target) == dirs
    assert _mode(target / sub.name) == dirs
    assert _mode(target / sub.name / Path(private).name) == files
    assert _mode(target / "manifest.json") == files
    assert _mode(target / "run.sh") == execs
    assert (target / "link").is_symlink()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # the umask probe is gone

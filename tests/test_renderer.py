"""The backports source is derived from the machine's own apt configuration, never a hard-coded mirror."""

import pytest

from rvla_peft.renderer import backports_source


def test_backports_source_from_deb822(tmp_path):
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    source = backports_source(tmp_path, codename="bookworm")
    assert "URIs: http://mirror.example/debian\n" in source
    assert "Suites: bookworm-backports\n" in source
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in source
    assert "security" not in source


def test_backports_source_from_one_line_list(tmp_path):
    (tmp_path / "mirror.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main contrib\n"
    )
    source = backports_source(tmp_path, codename="bookworm")
    assert "URIs: http://mirror.example/debian\nSuites: bookworm-backports\nComponents: main contrib\n" in source


def test_no_source_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="No apt source for the 'bookworm' release"):
        backports_source(tmp_path, codename="bookworm")

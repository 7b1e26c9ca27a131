"""The backports source is derived from the machine's own apt configuration, never a hard-coded mirror."""

import os

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


@pytest.fixture
def lavapipe_installed(tmp_path, monkeypatch):
    """The private lavapipe installed, no ICD chosen by the user; GPU driver files and device nodes absent until a
    test creates them."""
    from rvla_peft import renderer

    icd = tmp_path / "lavapipe" / "lvp_icd.json"
    icd.parent.mkdir()
    icd.write_text("{}")
    monkeypatch.setattr(renderer, "PREFIX", icd.parent)
    monkeypatch.setattr(renderer, "ICD_FILE", icd)
    monkeypatch.setattr(renderer, "NVIDIA_ICD_FILES", (str(tmp_path / "icd.d" / "nvidia_icd.json"),))
    monkeypatch.setattr(renderer, "CUDA_DEVICE_NODES", str(tmp_path / "dev" / "nvidia[0-9]*"))
    environ = {k: v for k, v in os.environ.items() if k not in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES")}
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    monkeypatch.setattr(os, "environ", environ)
    return tmp_path


def gpu_parts(root, icd: bool, device: bool) -> None:
    if icd:
        (root / "icd.d").mkdir()
        (root / "icd.d" / "nvidia_icd.json").write_text("{}")
    if device:
        (root / "dev").mkdir()
        (root / "dev" / "nvidia0").write_text("")


def test_a_gpu_with_its_vulkan_driver_renders_on_the_gpu_even_with_lavapipe_installed(lavapipe_installed):
    from rvla_peft.renderer import ensure_vulkan

    gpu_parts(lavapipe_installed, icd=True, device=True)
    assert ensure_vulkan() is None
    assert "VK_ICD_FILENAMES" not in os.environ


@pytest.mark.parametrize("icd, device, hidden", [(False, False, False), (True, False, False), (False, True, False),
                                                 (True, True, True)])  # fmt: skip
def test_lavapipe_is_used_where_no_gpu_can_render(lavapipe_installed, icd, device, hidden):
    from rvla_peft import renderer

    gpu_parts(lavapipe_installed, icd=icd, device=device)
    if hidden:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    assert renderer.ensure_vulkan() == str(renderer.ICD_FILE)
    assert os.environ["VK_ICD_FILENAMES"] == str(renderer.ICD_FILE)

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


# --- SAPIEN's PhysX GPU library carried to a machine without internet (no network here: a stand-in file)

FAKE_LIBRARY = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 4  # an ELF header, then bytes


def test_physx_install_places_the_library_where_sapien_looks(tmp_path, monkeypatch):
    import hashlib

    from rvla_peft import renderer

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    carried = tmp_path / "carried" / renderer.PHYSX_LIBRARY
    carried.parent.mkdir()
    carried.write_bytes(FAKE_LIBRARY)
    carried.with_name(carried.name + ".sha256").write_text(f"{hashlib.sha256(FAKE_LIBRARY).hexdigest()}  x\n")
    renderer.main(["physx", "--install", str(carried)])
    import sapien.physx

    # the folder sapien.physx.enable_gpu reads: Path.home() / ".sapien" / "physx" / version()
    installed = home / ".sapien" / "physx" / sapien.physx.version() / "libPhysXGpu_64.so"
    assert installed.read_bytes() == FAKE_LIBRARY
    assert renderer.physx_folder() == installed.parent
    # the release's zip is accepted as well
    zipped = tmp_path / "linux-so.zip"
    import zipfile

    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("libPhysXGpu_64.so", b"<html>rate limited</html>")  # not ELF inside: refused
    with pytest.raises(SystemExit, match="not a shared library"):
        renderer.main(["physx", "--install", str(zipped), "--physx-version", "v-test"])
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("linux-so/libPhysXGpu_64.so", FAKE_LIBRARY)
    assert renderer.physx_install(zipped, "v-test").read_bytes() == FAKE_LIBRARY


def test_physx_install_refuses_a_damaged_copy(tmp_path, monkeypatch):
    from rvla_peft import renderer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    carried = tmp_path / renderer.PHYSX_LIBRARY
    carried.write_bytes(FAKE_LIBRARY[:-10])  # cut short in the copy
    carried.with_name(carried.name + ".sha256").write_text("0" * 64 + "  libPhysXGpu_64.so\n")
    with pytest.raises(SystemExit, match="does not match .*sha256"):
        renderer.main(["physx", "--install", str(carried), "--physx-version", "v-test"])
    assert not (tmp_path / "home" / ".sapien" / "physx" / "v-test" / renderer.PHYSX_LIBRARY).exists()
    with pytest.raises(SystemExit, match="no such file"):
        renderer.main(["physx", "--install", str(tmp_path / "absent.so"), "--physx-version", "v-test"])
    with pytest.raises(SystemExit):  # neither --download nor --install
        renderer.main(["physx"])

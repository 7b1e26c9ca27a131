"""Find (and, on request, install) a Vulkan device for SAPIEN, the renderer ManiSkill needs.

SAPIEN asks for a Vulkan device even for state-only observations. A machine without a GPU has none,
and Debian 12's own software renderer (lavapipe, Mesa 22.3) is rejected by SAPIEN; lavapipe from
Mesa 25 (the distribution's backports suite) works. ``python -m rvla_peft.renderer install`` unpacks
it into a private prefix inside the virtual environment, without touching the system's Mesa, and
:func:`ensure_vulkan` points the Vulkan loader at it in this process and its children, so that no
manual ``export`` is needed.

GPU simulation (``env.sim_backend=physx_cuda``) needs SAPIEN's PhysX GPU library, which SAPIEN downloads into
``~/.sapien/physx/VERSION/`` at the first GPU env. For a machine without internet: ``python -m rvla_peft.renderer
physx --download DIR`` where there is internet (the library and its sha256), then ``python -m rvla_peft.renderer
physx --install DIR/libPhysXGpu_64.so`` on the offline machine (placed where SAPIEN looks, checked).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PREFIX = Path(sys.prefix) / "share" / "rvla_peft" / "lavapipe"
ICD_FILE = PREFIX / "lvp_icd.json"
# Unpacked from backports; everything else lavapipe links against comes from the main suite.
BACKPORT_PACKAGES = ("mesa-vulkan-drivers", "libdrm2", "libdrm-amdgpu1")
MAIN_SUITE_PACKAGES = ("libvulkan1", "mesa-vulkan-drivers")

_configured = False
# Where the NVIDIA driver (and the NVIDIA container toolkit) puts its Vulkan ICD, and its CUDA device nodes.
NVIDIA_ICD_FILES = ("/usr/share/vulkan/icd.d/nvidia_icd.json", "/etc/vulkan/icd.d/nvidia_icd.json")
CUDA_DEVICE_NODES = "/dev/nvidia[0-9]*"


def _lib_dirs(prefix: Path) -> list[str]:
    return sorted({str(Path(p).parent) for p in glob.glob(str(prefix / "usr" / "lib" / "*" / "*.so*"))})


def ensure_vulkan() -> str | None:
    """Point Vulkan at the private lavapipe if it is installed, the user chose no ICD themselves, and the machine
    has no GPU to render with (a CUDA device and the NVIDIA Vulkan driver): an image with lavapipe installed that
    runs on a GPU machine renders on the GPU.

    Returns the ICD file in use, or None when the system's own devices are left to the loader. Called
    before SAPIEN is imported; cheap and idempotent.
    """
    global _configured
    if os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES"):
        return os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    if not ICD_FILE.exists() or (_has_gpu_vulkan() and _has_cuda_device()):
        return None
    lib_dirs = _lib_dirs(PREFIX)
    # Children (vector-env workers) read LD_LIBRARY_PATH at start-up; this process already started, so
    # its newer libdrm is loaded by hand before the Vulkan loader opens lavapipe.
    os.environ["VK_ICD_FILENAMES"] = str(ICD_FILE)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(
        os.pathsep
    )
    if not _configured:
        for name in ("libdrm.so.2", "libdrm_amdgpu.so.1"):
            for d in lib_dirs:
                if (Path(d) / name).exists():
                    ctypes.CDLL(str(Path(d) / name), mode=ctypes.RTLD_GLOBAL)
                    break
        _configured = True
    return str(ICD_FILE)


def _has_gpu_vulkan() -> bool:
    """A machine with an NVIDIA driver brings its own Vulkan ICD: nothing to install."""
    return any(Path(d).exists() for d in NVIDIA_ICD_FILES)


def _has_cuda_device() -> bool:
    """A visible CUDA device, from its device node (no CUDA initialisation: env workers fork after this)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob(CUDA_DEVICE_NODES))


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise RuntimeError("Installing the Vulkan runtime needs root (apt-get). Run `make setup` as root or with sudo.")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, env=env, **kw)


def backports_source(sources_dir: Path = Path("/etc/apt/sources.list.d"), codename: str | None = None) -> str:
    """A deb822 source for ``<codename>-backports``, built from the machine's own apt configuration.

    The entry whose suites hold the release's codename gives the mirror and the signing key, so no
    mirror host is written into this project.
    """
    codename = codename or _codename()
    stanzas = []
    for path in sorted(sources_dir.glob("*.sources")):
        stanzas += [s for s in re.split(r"\n\s*\n", path.read_text()) if s.strip()]
    for stanza in stanzas:
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, flags=re.M))
        if codename in fields.get("Suites", "").split():
            lines = [
                "Types: deb",
                f"URIs: {fields['URIs']}",
                f"Suites: {codename}-backports",
                f"Components: {fields.get('Components', 'main')}",
            ]
            if "Signed-By" in fields:
                lines.append(f"Signed-By: {fields['Signed-By']}")
            return "\n".join(lines) + "\n"
    for path in [sources_dir.parent / "sources.list", *sorted(sources_dir.glob("*.list"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                m = re.match(r"^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+" + re.escape(codename) + r"\s+(.+)$", line.strip())
                if m:
                    return f"Types: deb\nURIs: {m.group(2)}\nSuites: {codename}-backports\nComponents: {m.group(3)}\n"
    raise RuntimeError(f"No apt source for the '{codename}' release found under /etc/apt: cannot locate backports.")


def _codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=(\S+)$", text, flags=re.M)
    if not m:
        raise RuntimeError("Cannot read VERSION_CODENAME from /etc/os-release: not a Debian-like system?")
    return m.group(1).strip('"')


def install(force: bool = False) -> Path | None:
    """Unpack Mesa lavapipe from backports into :data:`PREFIX` and write its ICD file. Idempotent."""
    if ICD_FILE.exists() and not force:
        print(f"Vulkan software renderer already installed: {ICD_FILE}")
        return ICD_FILE
    if _has_gpu_vulkan() and not force:
        print("An NVIDIA Vulkan driver is present: using it.")
        return None
    if not shutil.which("apt-get"):
        raise RuntimeError("No apt-get: install a Vulkan driver (Mesa >= 24 lavapipe or a GPU driver) by hand.")
    sudo = _sudo()
    _run([*sudo, "apt-get", "update", "-qq"])
    _run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *MAIN_SUITE_PACKAGES])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A private apt state: the system's sources and lists are left untouched.
        (tmp / "lists" / "partial").mkdir(parents=True)
        (tmp / "cache" / "archives" / "partial").mkdir(parents=True)
        (tmp / "backports.sources").write_text(backports_source())
        opts = [
            f"-oDir::Etc::SourceList={tmp / 'backports.sources'}",
            "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={tmp / 'lists'}",
            f"-oDir::Cache={tmp / 'cache'}",
            "-oAPT::Sandbox::User=root",
            "-oDebug::NoLocking=1",
        ]
        _run(["apt-get", *opts, "update", "-qq"])
        _run(["apt-get", *opts, "download", "-qq", *BACKPORT_PACKAGES], cwd=tmp)
        PREFIX.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="lavapipe.", dir=PREFIX.parent))
        for deb in sorted(tmp.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(staging)])
    lvp = sorted(glob.glob(str(staging / "usr" / "lib" / "*" / "libvulkan_lvp.so")))
    if not lvp:
        raise RuntimeError("The backports mesa-vulkan-drivers package holds no libvulkan_lvp.so.")
    icd = {
        "file_format_version": "1.0.0",
        "ICD": {"library_path": lvp[0].replace(str(staging), str(PREFIX)), "api_version": "1.3.0"},
    }
    (staging / ICD_FILE.name).write_text(json.dumps(icd, indent=2))
    # Swap in whole so that an interrupted install never leaves a half-written prefix.
    if PREFIX.exists():
        shutil.rmtree(PREFIX)
    PREFIX.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(PREFIX)
    print(f"Installed the Vulkan software renderer: {ICD_FILE}")
    return ICD_FILE


# ---------------------------------------------------------------------------------------------------------------
# SAPIEN's PhysX GPU library, carried to a machine without internet

PHYSX_LIBRARY = "libPhysXGpu_64.so"  # Linux x86_64, the file sapien.physx.enable_gpu loads
PHYSX_RELEASES = "https://github.com/sapien-sim/physx-precompiled/releases/download"


def physx_version() -> str:
    """The PhysX build the installed SAPIEN loads (e.g. ``105.1-physx-5.3.1.patch0``)."""
    import sapien.physx

    return sapien.physx.version()


def physx_folder(version: str | None = None) -> Path:
    """Where SAPIEN looks for its PhysX GPU library (``sapien/physx/__init__.py``: ``~/.sapien/physx/VERSION``)."""
    return Path.home() / ".sapien" / "physx" / (version or physx_version())


def physx_url(version: str | None = None) -> str:
    return f"{PHYSX_RELEASES}/{version or physx_version()}/linux-so.zip"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def physx_download(directory: Path, version: str | None = None) -> Path:
    """Fetch SAPIEN's release zip (where there is internet) and write ``DIRECTORY/libPhysXGpu_64.so`` and its
    ``.sha256`` beside it: the two files to carry to an offline machine."""
    import requests

    url = physx_url(version)
    response = requests.get(url, timeout=600)
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        member = next((n for n in archive.namelist() if Path(n).name == PHYSX_LIBRARY), None)
        if member is None:
            raise RuntimeError(f"{url} holds no {PHYSX_LIBRARY} (its files: {archive.namelist()})")
        data = archive.read(member)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / PHYSX_LIBRARY
    library.write_bytes(data)
    (directory / f"{PHYSX_LIBRARY}.sha256").write_text(f"{_sha256(library)}  {PHYSX_LIBRARY}\n")
    print(f"Wrote {library} and its sha256 (PhysX {version or physx_version()}); on the offline machine run:")
    print(f"  python -m rvla_peft.renderer physx --install {library}")
    return library


def physx_install(library: Path, version: str | None = None) -> Path:
    """Place a PhysX GPU library (or the release's ``linux-so.zip``) where SAPIEN looks, after checking that it is
    a shared library and, where ``FILE.sha256`` lies beside it, that it matches. Returns the installed path."""
    library = Path(library)
    if not library.is_file():
        raise FileNotFoundError(
            f"{library}: no such file; make it with `python -m rvla_peft.renderer physx --download DIR`"
        )
    if zipfile.is_zipfile(library):
        with zipfile.ZipFile(library) as archive:
            member = next((n for n in archive.namelist() if Path(n).name == PHYSX_LIBRARY), None)
            if member is None:
                raise ValueError(f"{library} holds no {PHYSX_LIBRARY}")
            data = archive.read(member)
    else:
        data = library.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{library} is not a shared library (no ELF header): expected SAPIEN's {PHYSX_LIBRARY}")
    checksum = library.with_name(library.name + ".sha256")
    if checksum.is_file():
        expected = checksum.read_text().split()[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{library} does not match {checksum}: copied incompletely? Copy it again")
    folder = physx_folder(version)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / PHYSX_LIBRARY
    staging = folder / f".{PHYSX_LIBRARY}.partial"
    staging.write_bytes(data)
    staging.rename(target)  # atomic: SAPIEN never sees half a library
    print(f"Installed {target} (sha256 {hashlib.sha256(data).hexdigest()[:16]}...)")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rvla_peft.renderer", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=["install", "check", "where", "physx"],
        help="install / check / where: the Vulkan software renderer; physx: SAPIEN's PhysX GPU library",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    parser.add_argument("--download", type=Path, metavar="DIR", help="physx: fetch the library + sha256 into DIR")
    parser.add_argument("--install", type=Path, metavar="FILE", help="physx: install FILE where SAPIEN looks")
    parser.add_argument("--physx-version", help="physx: the PhysX build (default: the installed SAPIEN's)")
    args = parser.parse_args(argv)
    if args.command == "physx":
        if (args.download is None) == (args.install is None):
            parser.error("physx needs exactly one of --download DIR or --install FILE")
        if args.download is not None:
            physx_download(args.download, args.physx_version)
        else:
            try:
                physx_install(args.install, args.physx_version)
            except (OSError, ValueError) as e:
                raise SystemExit(f"error: {e}") from None
        return
    if args.command == "install":
        install(force=args.force)
    elif args.command == "where":
        print(ensure_vulkan() or "system default")
    else:
        ensure_vulkan()
        import sapien  # noqa: F401  (imports after the loader is configured)

        sapien.render.RenderSystem()  # raises "failed to find a rendering device" when there is none
        print("Vulkan rendering device: OK")


if __name__ == "__main__":
    main()

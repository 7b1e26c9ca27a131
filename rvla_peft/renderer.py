"""Find (and, on request, install) a Vulkan device for SAPIEN, the renderer ManiSkill needs.

SAPIEN asks for a Vulkan device even for state-only observations. A machine without a GPU has none,
and Debian 12's own software renderer (lavapipe, Mesa 22.3) is rejected by SAPIEN; lavapipe from
Mesa 25 (the distribution's backports suite) works. ``python -m rvla_peft.renderer install`` unpacks
it into a private prefix inside the virtual environment, without touching the system's Mesa, and
:func:`ensure_vulkan` points the Vulkan loader at it in this process and its children, so that no
manual ``export`` is needed.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rvla_peft.renderer", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "check", "where"])
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    args = parser.parse_args(argv)
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

"""ManiSkill's ``minimal`` camera shader pack without SAPIEN's BRDF lookup table, for CPU envs.

The first picture of a camera whose shaders declare ``samplerBRDFLUT`` makes SAPIEN (svulkan2's
``getDefaultBRDFLUT``) integrate a 512x512 BRDF table with a compute shader, once per process. On lavapipe, the
software Vulkan of a machine without a GPU, that is ~3 s: most of a PushCube-v1 env's creation (4.0 -> 0.9 s), paid
again by every async env worker. The ``minimal`` pack reads the table only in its specular image-based lighting,
which it multiplies by the environment map. ManiSkill's tabletop scenes set no environment map, so that term is 0
and leaving it out changes no pixel (``tests/test_render.py`` compares frames bit for bit). A scene that does set
one gets the stock pack back (:func:`has_environment_map`, checked by ``make_single_env``).

The pack is SAPIEN's own shader files, from the installed ``sapien``, with the table's two declarations and its one
read taken out, written once per machine and SAPIEN version under ``cache_dir()/shaders``. Where the installed
files differ from the ones these edits were written for, :func:`lean_shader_config` returns None and envs keep the
stock pack; ``RVLA_PEFT_STOCK_SHADERS=1`` asks for the stock pack everywhere (worker processes included).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

PACK = "minimal"
STOCK_SHADERS_ENV = "RVLA_PEFT_STOCK_SHADERS"  # set (to anything non-empty): every env draws with the stock pack
# (file, text in SAPIEN's file, its replacement): the table's declarations and the specular term that reads it
EDITS = (
    ("composite0.frag", "layout(set = 2, binding = 8) uniform sampler2D samplerBRDFLUT;\n", ""),
    ("gbuffer.frag", "layout(set = 3, binding = 8) uniform sampler2D samplerBRDFLUT;\n", ""),
    (
        "gbuffer.frag",
        "  vec2 envBRDF = texture(samplerBRDFLUT, vec2(roughness, dotNV)).xy;\n"
        "  return color * (fresnel * envBRDF.x + envBRDF.y);\n",
        "  return vec3(0.0);  // rvla_peft: no environment map, so no specular image-based light\n",
    ),
)


def _sapien_shader_root() -> Path:
    import sapien

    return Path(sapien.__file__).parent / "vulkan_shader"


def lean_pack_files(root: Path) -> dict[str, str] | None:
    """The lean pack's files {relative path: text} from SAPIEN's shader folder ``root``, or None where an edit does
    not apply (another SAPIEN's shaders)."""
    files = {f"common/{p.name}": p.read_text() for p in sorted((root / "common").iterdir()) if p.is_file()}
    pack = {p.name: p.read_text() for p in sorted((root / PACK).iterdir()) if p.is_file()}
    for name, old, new in EDITS:
        if pack.get(name, "").count(old) != 1:
            return None
        pack[name] = pack[name].replace(old, new)
    return files | {f"{PACK}_lean/{name}": text for name, text in pack.items()}


def _write_pack(files: dict[str, str], target: Path) -> None:
    """All files into a temp folder beside ``target``, then one rename: workers starting together see either no
    pack or a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first (ENOTEMPTY / EEXIST): its pack is the same
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def lean_shader_dir() -> Path | None:
    """The lean pack's folder (written on first use), or None where SAPIEN's shaders differ or the cache is not
    writable."""
    from rvla_peft.models.tiny import cache_dir

    files = lean_pack_files(_sapien_shader_root())
    if files is None:
        return None
    digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    root = cache_dir() / "shaders" / digest
    if not (root / f"{PACK}_lean").is_dir():
        try:
            _write_pack(files, root)
        except OSError:  # a read-only cache only costs time
            return None
    return root / f"{PACK}_lean"


def lean_shader_config() -> Any | None:
    """A ManiSkill ``ShaderConfig`` for sensor cameras: the lean pack with the ``minimal`` pack's textures and
    transforms, or None (use the stock pack). Sets SAPIEN's picture formats as ManiSkill does for ``minimal``
    (it does so only for that name): global, and the same as the stock pack's."""
    import sapien
    from mani_skill.render.shaders import PREBUILT_SHADER_CONFIGS, ShaderConfig

    folder = None if os.environ.get(STOCK_SHADERS_ENV) else lean_shader_dir()
    if folder is None:
        return None
    stock = PREBUILT_SHADER_CONFIGS[PACK]
    sapien.render.set_picture_format("Color", "r8g8b8a8unorm")
    sapien.render.set_picture_format("ColorRaw", "r8g8b8a8unorm")
    sapien.render.set_picture_format("PositionSegmentation", "r16g16b16a16sint")
    return ShaderConfig(
        shader_pack=str(folder),
        texture_names=stock.texture_names,
        shader_pack_config=stock.shader_pack_config,
        texture_transforms=stock.texture_transforms,
    )


def has_environment_map(env: Any) -> bool:
    """Whether any sub-scene of a ManiSkill env has an environment map (which the lean pack would not light with)."""
    return any(s.render_system.cubemap is not None for s in env.unwrapped.scene.sub_scenes)

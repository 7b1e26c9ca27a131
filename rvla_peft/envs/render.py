"""Cheaper camera frames on the CPU renderer: draw fewer triangles, leave the physics alone.

On lavapipe (software Vulkan, the renderer of a machine without a GPU) a small ManiSkill frame costs what its
triangles cost, not its pixels: PushCube-v1 draws ~157k triangles (the Panda's visual meshes 135k, a 101x101
ground grid 20k), about 40 per pixel of a 64x64 image, and ``get_picture`` waits ~33 ms for them. No ManiSkill or
SAPIEN render setting changes that (README, "Rendering on the CPU"). ``render_detail="fast"`` swaps, in the live
scene and through SAPIEN's public component API:

- each robot link's render meshes for copies decimated by 90% (quadric decimation by ``fast-simplification``,
  normals recomputed and split at a 20 degree crease); collision shapes, hence the physics, are untouched;
- the ground grid for 2 triangles with the same corners, normal and texture coordinates (pixel-identical).

Bodies with a textured or normal-mapped material (the table) and primitives (the cube, the goal) are left alone:
decimation drops texture coordinates and tangents.

    env = with_render_detail(gym.make("PushCube-v1", sim_backend="physx_cpu", ...), "fast")

Decimated meshes are cached per (mesh content, settings) in the process and on disk (``cache_dir()/render_meshes``),
so that env creation stays cheap and every env of a run, in any worker process, gets byte-identical meshes.
CPU simulation only: on the GPU the batched CUDA renderer is not triangle-bound, and swapping render components
after ManiSkill has set up its batched GPU render system was never tried.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
import numpy as np

from rvla_peft.utils.io import atomic_write

if TYPE_CHECKING:
    import sapien

RenderDetail = Literal["full", "fast"]
RENDER_DETAILS: tuple[str, ...] = ("full", "fast")

REDUCTION = 0.9  # fraction of each robot mesh's triangles removed: 135k -> 13.6k on the Panda
MIN_TRIANGLES = 200  # parts this small (finger pads, screws) are kept as they are
CREASE_DEG = 20.0  # normals are averaged across edges flatter than this, split at sharper ones (20-25: closest frames)
_FORMAT = 1  # bump when decimate() changes its output, so that disk caches are rebuilt

_TEXTURES = (
    "base_color_texture",
    "normal_texture",
    "roughness_texture",
    "metallic_texture",
    "emission_texture",
    "transmission_texture",
)


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh as SAPIEN takes it: one normal per vertex."""

    vertices: np.ndarray  # float32 [V, 3]
    triangles: np.ndarray  # uint32 [F, 3]
    normals: np.ndarray  # float32 [V, 3]


# --------------------------------------------------------------------------------------------------------------
# Mesh maths (pure)


def weld(vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (to 1e-6). The robot meshes come as triangle soups (every corner its own
    vertex), across which a decimator cannot collapse edges."""
    positions, inverse = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
    return positions, inverse.reshape(-1)[triangles]


def smooth_normals(vertices: np.ndarray, triangles: np.ndarray, crease_deg: float = CREASE_DEG) -> Mesh:
    """Vertex normals averaged over the faces around a vertex, with vertices split along edges sharper than
    ``crease_deg`` (so that a box keeps its edges while a cylinder shades round)."""
    import trimesh

    mesh = trimesh.Trimesh(vertices, triangles, process=False)
    smooth = trimesh.graph.smooth_shade(mesh, angle=np.radians(crease_deg))
    return Mesh(
        np.asarray(smooth.vertices, np.float32),
        np.asarray(smooth.faces, np.uint32),
        np.asarray(smooth.vertex_normals, np.float32),
    )


def _fast_simplification() -> Any:
    try:
        import fast_simplification
    except ImportError as e:
        raise ImportError(
            "env.render_detail='fast' needs fast-simplification (the 'sim' extra: `pip install -e .[sim]`); "
            "or set env.render_detail=full"
        ) from e
    return fast_simplification


def decimate(
    vertices: np.ndarray, triangles: np.ndarray, reduction: float = REDUCTION, crease_deg: float = CREASE_DEG
) -> Mesh:
    """Weld, remove ``reduction`` of the triangles by quadric edge collapse, recompute normals. Deterministic."""
    fast_simplification = _fast_simplification()
    welded, faces = weld(np.asarray(vertices, np.float64), np.asarray(triangles, np.int64))
    points, faces = fast_simplification.simplify(
        welded.astype(np.float32), faces.astype(np.int32), target_reduction=reduction
    )
    return smooth_normals(np.asarray(points, np.float64), np.asarray(faces, np.int64), crease_deg)


def flat_quad(
    vertices: np.ndarray, triangles: np.ndarray, normals: np.ndarray, uvs: np.ndarray
) -> tuple[Mesh, np.ndarray] | None:
    """(the 2-triangle rectangle, its texture coordinates) equal to a flat, hole-free grid in a z = const plane whose
    texture coordinates are affine in (x, y), such as ManiSkill's ground: same corners, normal, winding and texture
    coordinates. None for any mesh where the swap would not be exact."""
    vertices, normals, uvs = (np.asarray(a, np.float64) for a in (vertices, normals, uvs))
    triangles = np.asarray(triangles, np.int64)
    if len(triangles) <= 2 or np.ptp(vertices[:, 2]) > 1e-6 or np.ptp(normals, axis=0).max() > 1e-6:
        return None
    (x0, y0), (x1, y1) = vertices[:, :2].min(axis=0), vertices[:, :2].max(axis=0)
    corners3 = vertices[triangles]
    twice_area = np.cross(corners3[:, 1] - corners3[:, 0], corners3[:, 2] - corners3[:, 0])[:, 2]
    if not np.isclose(np.abs(twice_area).sum(), 2 * (x1 - x0) * (y1 - y0), rtol=1e-5):  # holes or overlaps
        return None
    design = np.c_[vertices[:, :2], np.ones(len(vertices))]
    coef, *_ = np.linalg.lstsq(design, uvs, rcond=None)
    if np.abs(design @ coef - uvs).max() > 1e-4:
        return None
    z = vertices[0, 2]
    corners = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])
    # keep the grid's winding, so that the same side stays the front face
    quad = [[0, 1, 2], [0, 2, 3]] if twice_area[0] > 0 else [[0, 2, 1], [0, 3, 2]]
    mesh = Mesh(
        corners.astype(np.float32), np.asarray(quad, np.uint32), np.repeat(normals[:1], 4, axis=0).astype(np.float32)
    )
    return mesh, (np.c_[corners[:, :2], np.ones(4)] @ coef).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Cache: in the process, and on disk


_MEMORY: dict[str, Mesh] = {}


def mesh_cache_dir() -> Path:
    from rvla_peft.models.tiny import cache_dir

    return cache_dir() / "render_meshes"


def cache_key(vertices: np.ndarray, triangles: np.ndarray, reduction: float, crease_deg: float) -> str:
    """Content hash of a mesh and the settings (and library versions) that decimate it."""
    import trimesh

    fast_simplification = _fast_simplification()
    digest = hashlib.sha256(
        f"{_FORMAT}:{reduction!r}:{crease_deg!r}:{fast_simplification.__version__}:{trimesh.__version__}".encode()
    )
    digest.update(np.ascontiguousarray(vertices, np.float32).tobytes())
    digest.update(np.ascontiguousarray(triangles, np.uint32).tobytes())
    return digest.hexdigest()[:32]


def _load(path: Path) -> Mesh | None:
    try:
        with np.load(path) as data:
            return Mesh(data["vertices"], data["triangles"], data["normals"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # absent or damaged: rebuild it
        return None


def _save(path: Path, mesh: Mesh) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, vertices=mesh.vertices, triangles=mesh.triangles, normals=mesh.normals)

    try:
        atomic_write(path, write)
    except OSError:  # a read-only cache only costs time
        pass


def decimated(
    vertices: np.ndarray,
    triangles: np.ndarray,
    reduction: float = REDUCTION,
    crease_deg: float = CREASE_DEG,
    cache: Path | None = None,
) -> Mesh:
    """:func:`decimate`, memoised in the process and, with ``cache``, in ``cache/<key>.npz``."""
    key = cache_key(vertices, triangles, reduction, crease_deg)
    mesh = _MEMORY.get(key)
    if mesh is None and cache is not None:
        mesh = _load(cache / f"{key}.npz")
    if mesh is None:
        mesh = decimate(vertices, triangles, reduction, crease_deg)
        if cache is not None:
            _save(cache / f"{key}.npz", mesh)
    _MEMORY[key] = mesh
    return mesh


# --------------------------------------------------------------------------------------------------------------
# Scene surgery (SAPIEN render components; CPU simulation)


def _plain(material: Any) -> bool:
    return all(getattr(material, name) is None for name in _TEXTURES)


def body_triangles(body: sapien.render.RenderBodyComponent) -> int:
    return sum(len(part.get_triangles()) for shape in body.render_shapes for part in shape.parts)


def _shape(mesh: Mesh, uvs: np.ndarray, material: Any, like: Any) -> Any:
    import sapien

    shape = sapien.render.RenderShapeTriangleMesh(mesh.vertices, mesh.triangles, mesh.normals, uvs, material)
    shape.local_pose = like.local_pose
    shape.set_front_face(like.get_front_face())
    shape.name = like.name
    return shape


def _replace_body(entity: sapien.Entity, old: Any, shapes: list[Any]) -> None:
    import sapien

    new = sapien.render.RenderBodyComponent()
    for shape in shapes:
        new.attach(shape)
    new.name, new.visibility, new.shading_mode = old.name, old.visibility, old.shading_mode
    if old.is_render_id_disabled:
        new.disable_render_id()
    enabled = old.is_enabled
    entity.remove_component(old)
    entity.add_component(new)
    if not enabled:
        new.disable()


def simplify_body(
    entity: sapien.Entity,
    reduction: float = REDUCTION,
    crease_deg: float = CREASE_DEG,
    min_triangles: int = MIN_TRIANGLES,
    cache: Path | None = None,
) -> tuple[int, int]:
    """Swap the entity's render body for one whose mesh parts above ``min_triangles`` are decimated; parts below
    are copied as they are. Bodies with textures or non-mesh shapes are left alone. Returns triangles (before,
    after)."""
    import sapien

    old = entity.find_component_by_type(sapien.render.RenderBodyComponent)
    if old is None:
        return 0, 0
    count = body_triangles(old)
    shapes = old.render_shapes
    parts = [part for shape in shapes for part in shape.parts]
    if (
        not all(isinstance(shape, sapien.render.RenderShapeTriangleMesh) for shape in shapes)
        or not all(_plain(part.material) for part in parts)
        or all(len(part.get_triangles()) <= min_triangles for part in parts)
    ):
        return count, count
    new_shapes = []
    for shape in shapes:
        scale = np.asarray(shape.scale, np.float64)
        for part in shape.parts:
            vertices, triangles = np.asarray(part.get_vertices(), np.float64) * scale, part.get_triangles()
            if len(triangles) > min_triangles:
                mesh = decimated(vertices, triangles, reduction, crease_deg, cache)
                uvs = np.zeros((len(mesh.vertices), 2), np.float32)  # no texture reads them (checked above)
            else:
                normals = np.asarray(part.get_vertex_normal(), np.float64) / scale  # normals of the scaled surface
                normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
                triangles = np.asarray(triangles, np.uint32)
                mesh = Mesh(vertices.astype(np.float32), triangles, normals.astype(np.float32))
                uvs = np.asarray(part.get_vertex_uv(), np.float32)
            new_shapes.append(_shape(mesh, uvs, part.material, shape))
    _replace_body(entity, old, new_shapes)
    return count, sum(len(shape.parts[0].get_triangles()) for shape in new_shapes)


def flatten_ground(entity: sapien.Entity) -> tuple[int, int]:
    """Swap a flat grid's render body (ManiSkill's 20k-triangle ground) for 2 triangles per part, pixel-identical;
    left alone when any part is not such a grid (:func:`flat_quad`). Returns triangles (before, after)."""
    import sapien

    old = entity.find_component_by_type(sapien.render.RenderBodyComponent)
    if old is None:
        return 0, 0
    count = body_triangles(old)
    if not all(isinstance(shape, sapien.render.RenderShapeTriangleMesh) for shape in old.render_shapes):
        return count, count
    new_shapes = []
    for shape in old.render_shapes:
        scale = np.asarray(shape.scale, np.float64)
        for part in shape.parts:
            quad = flat_quad(
                np.asarray(part.get_vertices(), np.float64) * scale,
                part.get_triangles(),
                part.get_vertex_normal(),
                part.get_vertex_uv(),
            )
            if quad is None or np.any(scale[:2] <= 0):  # a mirrored scale would flip the winding test
                return count, count
            new_shapes.append(_shape(*quad, part.material, shape))
    _replace_body(entity, old, new_shapes)
    return count, 2 * len(new_shapes)


def _robot_entities(env: Any) -> list[sapien.Entity]:
    agent = env.agent
    agents = list(getattr(agent, "agents", None) or ([agent] if agent is not None else []))
    # ManiSkill's Link wraps one physx link component per sub-scene (._objs, as ManiSkill itself reads it)
    return [obj.entity for a in agents for link in a.robot.links for obj in link._objs]


def lighten_scene(
    env: gym.Env, reduction: float = REDUCTION, crease_deg: float = CREASE_DEG, cache: Path | None = None
) -> tuple[int, int]:
    """Decimate the robot's render meshes and flatten the ground of a CPU ManiSkill env's current scene. Returns the
    scene's triangles (before, after). Call it once per scene (a second call would decimate the copies again) and
    again after every reset that rebuilds the scene."""
    base = env.unwrapped
    if base.gpu_sim_enabled:
        raise ValueError("render_detail='fast' applies to CPU simulation only (physx_cpu)")
    total = count_triangles(env)
    removed = 0
    for entity in _robot_entities(base):
        before, after = simplify_body(entity, reduction, crease_deg, cache=cache)
        removed += before - after
    ground = base.scene.actors.get("ground")
    for entity in ground._objs if ground is not None else []:  # Actor wraps one entity per sub-scene
        before, after = flatten_ground(entity)
        removed += before - after
    return total, total - removed


def count_triangles(env: gym.Env) -> int:
    """Triangles of every render body in the env's scene (hidden ones included)."""
    import sapien

    bodies = [
        entity.find_component_by_type(sapien.render.RenderBodyComponent)
        for scene in env.unwrapped.scene.sub_scenes
        for entity in scene.entities
    ]
    return sum(body_triangles(body) for body in bodies if body is not None)


class FastRender(gym.Wrapper):
    """A CPU ManiSkill env whose scene is kept light (:func:`lighten_scene`): at once, and after every reset that
    rebuilt the scene (``info["reconfigure"]``), whose first frame is then drawn again from the light scene.

    ``triangles`` holds (before, after) of the last swap."""

    def __init__(
        self, env: gym.Env, reduction: float = REDUCTION, crease_deg: float = CREASE_DEG, cache: Path | None = None
    ) -> None:
        super().__init__(env)
        self._settings = dict(reduction=reduction, crease_deg=crease_deg, cache=cache)
        self.triangles = lighten_scene(env, **self._settings)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        if info.get("reconfigure", False):
            self.triangles = lighten_scene(self.env, **self._settings)
            base = self.env.unwrapped
            obs = base.get_obs(info)  # same state, drawn again: the reset's frame came from the full-detail scene
            base._last_obs = obs  # what ManiSkill keeps for partial resets
        return obs, info


def with_render_detail(env: gym.Env, detail: RenderDetail) -> gym.Env:
    """``env`` as it is ("full") or wrapped in :class:`FastRender` ("fast"); for CPU-simulated ManiSkill envs."""
    if detail == "full":
        return env
    if detail == "fast":
        return FastRender(env, cache=mesh_cache_dir())
    raise ValueError(f"unknown render detail {detail!r}; expected one of {RENDER_DETAILS}")

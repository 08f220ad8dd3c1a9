"""``shapes``: vitlab's embedded synthetic data set.

Ten shape classes drawn at a random position, scale, rotation and colour, each filled with one of
ten procedural textures and set on a background with another texture. Nothing is shipped: images
are rendered on the fly, deterministically from a seed, by vectorised tensor code (about 20,000
32x32 images in a few seconds on two CPU cores), and cached on disk.

Besides its class label every image carries its object mask (for segmentation and localisation)
and the label of the texture filling the object. ``texture_mode`` decides how texture relates to
class: ``"random"`` (default: texture carries no information, only shape decides the class),
``"match"`` (texture = class, so shape and texture both predict it) and ``"conflict"`` (texture
of a different class: the cue-conflict images used to measure shape bias).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VitlabError

SHAPE_CLASSES = (
    "circle", "triangle", "square", "star", "cross", "ring", "crescent", "heart", "arrow", "hourglass",
)
TEXTURES = (
    "stripes", "checker", "dots", "grid", "noise", "concentric", "zigzag", "blotches", "waves", "gradient",
)
TEXTURE_MODES = ("random", "match", "conflict")

# Object masks are rendered at this multiple of the output size and averaged down: cheap
# anti-aliasing of the edges. Textures are smooth enough to render at the output size.
_SUPERSAMPLE = 2
_CHUNK = 1024  # images rendered at once; bounds memory to a few tens of MB


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that determines a ``shapes`` split. Equal configs give identical images."""

    num_images: int = 20_000
    image_size: int = 32
    seed: int = 0
    texture_mode: str = "random"
    #: Object diameter as a fraction of the image side, drawn uniformly from this range.
    scale: tuple[float, float] = (0.55, 0.95)
    #: Objects are rotated by a uniform angle in [-rotation, rotation] degrees (180: any angle).
    #: Mostly upright objects, as in photographs, keep the default task learnable in minutes.
    rotation: float = 30.0
    #: Brightness difference between object and background (0..1 scale), drawn from this range.
    brightness_gap: tuple[float, float] = (0.3, 0.55)
    #: Difference between the two colours of the object's and of the background's texture.
    object_contrast: tuple[float, float] = (0.1, 0.25)
    background_contrast: tuple[float, float] = (0.0, 0.1)
    #: Standard deviation of per-pixel Gaussian noise added to the finished image (0..1 scale).
    pixel_noise: float = 0.03

    def __post_init__(self) -> None:
        if self.texture_mode not in TEXTURE_MODES:
            raise VitlabError(f"texture_mode must be one of {', '.join(TEXTURE_MODES)}, not '{self.texture_mode}'")
        if self.image_size < 8:
            raise VitlabError(f"shapes needs an image size of at least 8 pixels, not {self.image_size}")
        if self.num_images < 1:
            raise VitlabError(f"the shapes split is empty ({self.num_images} images); ask for at least one image")

    def key(self) -> str:
        """A short hash identifying this config (the cache file name)."""
        blob = json.dumps(asdict(self), sort_keys=True) + f"|v{_GENERATOR_VERSION}"
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


# Bump when rendering changes, so stale cache files are never reused.
_GENERATOR_VERSION = 2


@dataclass
class ShapesArrays:
    """A rendered split: uint8 images (N, 3, H, W), labels, object masks (N, H, W), textures."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    textures: torch.Tensor
    background_textures: torch.Tensor


# --- shapes: each maps local coordinates (u, v), object radius 1, to an inside mask ---------------


def _regular_polygon(u: torch.Tensor, v: torch.Tensor, sides: int, inradius: float) -> torch.Tensor:
    angles = torch.arange(sides, dtype=u.dtype) * (2 * math.pi / sides) + math.pi / 2
    # Inside a convex polygon = on the inner side of every edge's supporting line.
    proj = u[..., None] * torch.cos(angles) + v[..., None] * torch.sin(angles)
    return proj.amax(-1) <= inradius


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r, phi = torch.hypot(u, v), torch.atan2(v, u)
    t = torch.remainder(phi * 5 / (2 * math.pi), 1.0)  # position within one of the 5 arms
    tri = (2 * t - 1).abs()  # 1 at a tip, 0 between tips
    return r <= 0.38 + 0.57 * tri


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x, y = u * 1.25, -v * 1.25 + 0.25
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shaft = (v.abs() <= 0.2) & (u >= -0.9) & (u <= 0.1)
    head = (u >= 0.0) & (u <= 0.9) & (v.abs() <= (0.9 - u) * 0.75)
    return shaft | head


_SHAPE_FNS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    lambda u, v: u * u + v * v <= 0.8**2,  # circle
    lambda u, v: _regular_polygon(u, v, 3, 0.48),  # triangle
    lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.66,  # square
    _star,
    lambda u, v: ((u.abs() <= 0.26) & (v.abs() <= 0.88)) | ((v.abs() <= 0.26) & (u.abs() <= 0.88)),  # cross
    lambda u, v: ((u * u + v * v) <= 0.88**2) & ((u * u + v * v) >= 0.5**2),  # ring
    lambda u, v: ((u * u + v * v) <= 0.88**2) & (((u - 0.42) ** 2 + v * v) >= 0.7**2),  # crescent
    _heart,
    _arrow,
    lambda u, v: (v.abs() <= 0.85) & (u.abs() <= v.abs() * 0.8 + 0.06),  # hourglass (bow tie)
)


# --- textures: each maps rotated, frequency-scaled coordinates to a pattern in [0, 1] -------------


def _pattern(kind: int, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Texture ``kind`` at coordinates (n, S, S) already rotated and scaled to texture periods."""
    n = x.shape[0]
    two_pi = 2 * math.pi
    if kind == 0:  # stripes
        return 0.5 + 0.5 * torch.sin(two_pi * x)
    if kind == 1:  # checker
        return ((torch.sin(two_pi * x) * torch.sin(two_pi * y)) > 0).float()
    if kind == 2:  # dots
        return ((torch.cos(two_pi * x) * torch.cos(two_pi * y)) > 0.45).float()
    if kind == 3:  # grid lines
        return ((torch.cos(two_pi * x) > 0.7) | (torch.cos(two_pi * y) > 0.7)).float()
    if kind == 4:  # per-pixel noise
        return torch.rand(x.shape, generator=g)
    if kind == 5:  # concentric rings about the texture origin
        return 0.5 + 0.5 * torch.sin(two_pi * torch.hypot(x, y))
    if kind == 6:  # zigzag
        tri = 2 * (torch.remainder(y, 1.0) - 0.5).abs()
        return 0.5 + 0.5 * torch.sin(two_pi * (x + tri))
    if kind == 7:  # blotches: smooth low-frequency noise
        size = x.shape[-1]
        coarse = torch.rand(n, 1, 5, 5, generator=g)
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
        return (smooth > 0.5).float()
    if kind == 8:  # waves: stripes bent by a sinusoid
        return 0.5 + 0.5 * torch.sin(two_pi * (x + 0.35 * torch.sin(two_pi * 0.5 * y)))
    if kind == 9:  # gradient across the texture period
        return torch.remainder(x * 0.5, 1.0)
    raise ValueError(kind)


def _texture_coords(n: int, grid: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly rotated, shifted and scaled coordinates: 2.5 to 4.5 texture periods per image."""
    angle = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    freq = 2.5 + 2.0 * torch.rand(n, 1, 1, generator=g)
    origin = torch.rand(n, 2, 1, 1, generator=g)
    gx, gy = grid[0] - origin[:, 0], grid[1] - origin[:, 1]
    x = (gx * torch.cos(angle) + gy * torch.sin(angle)) * freq
    y = (-gx * torch.sin(angle) + gy * torch.cos(angle)) * freq
    return x, y


def _render_textures(kinds: torch.Tensor, grid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = kinds.shape[0]
    x, y = _texture_coords(n, grid, g)
    out = torch.empty(n, grid.shape[-1], grid.shape[-1])
    for kind in range(len(TEXTURES)):
        idx = (kinds == kind).nonzero().flatten()
        if len(idx):
            out[idx] = _pattern(kind, x[idx], y[idx], g)
    return out


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=g)


def _random_palette(n: int, cfg: ShapesConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two colours per image for (object, background): the object stands out by brightness.

    The background brightness is random; the object's differs from it by ``cfg.brightness_gap``
    (up or down, whichever fits), so shape edges are visible whatever the colours and textures.
    """
    bg_level = 0.15 + 0.7 * torch.rand(n, generator=g)
    gap = _uniform(n, cfg.brightness_gap, g)
    up = torch.rand(n, generator=g) < 0.5
    up = torch.where(bg_level + gap > 0.95, torch.zeros_like(up),
                     torch.where(bg_level - gap < 0.05, torch.ones_like(up), up))
    obj_level = torch.where(up, bg_level + gap, bg_level - gap)

    def colours(level: torch.Tensor, contrast: tuple[float, float]) -> torch.Tensor:
        hue = torch.randn(n, 3, generator=g) * 0.15
        hue = hue - hue.mean(1, keepdim=True)  # chroma only: keeps the brightness at `level`
        base = level[:, None] + hue
        c = _uniform(n, contrast, g)[:, None]
        return torch.stack([base - c / 2, base + c / 2], 1).clamp(0, 1)  # (n, 2 colours, 3)

    return colours(obj_level, cfg.object_contrast), colours(bg_level, cfg.background_contrast)


def _pixel_grid(size: int) -> torch.Tensor:
    """(2, size, size) x and y coordinates of pixel centres in [0, 1]."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.stack(torch.meshgrid(coords, coords, indexing="xy"))


def _render_chunk(
    labels: torch.Tensor, textures: torch.Tensor, bg_textures: torch.Tensor, cfg: ShapesConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    n = labels.shape[0]
    grid_fine, grid = _pixel_grid(cfg.image_size * _SUPERSAMPLE), _pixel_grid(cfg.image_size)

    lo, hi = cfg.scale
    radius = (lo + (hi - lo) * torch.rand(n, generator=g)) / 2
    centre = radius[:, None] + (1 - 2 * radius[:, None]) * torch.rand(n, 2, generator=g)
    angle = (2 * torch.rand(n, generator=g) - 1) * math.radians(cfg.rotation)
    dx = (grid_fine[0] - centre[:, 0, None, None]) / radius[:, None, None]
    dy = (grid_fine[1] - centre[:, 1, None, None]) / radius[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos

    inside = torch.zeros(u.shape, dtype=torch.bool)
    for cls, shape_fn in enumerate(_SHAPE_FNS):
        idx = (labels == cls).nonzero().flatten()
        if len(idx):
            inside[idx] = shape_fn(u[idx], v[idx])

    obj_colours, bg_colours = _random_palette(n, cfg, g)
    obj_pattern = _render_textures(textures, grid, g)[:, None]
    bg_pattern = _render_textures(bg_textures, grid, g)[:, None]
    obj = obj_colours[:, 0, :, None, None] * (1 - obj_pattern) + obj_colours[:, 1, :, None, None] * obj_pattern
    bg = bg_colours[:, 0, :, None, None] * (1 - bg_pattern) + bg_colours[:, 1, :, None, None] * bg_pattern
    alpha = F.avg_pool2d(inside[:, None].float(), _SUPERSAMPLE)  # fraction of each pixel inside
    image = alpha * obj + (1 - alpha) * bg
    if cfg.pixel_noise > 0:
        image = image + cfg.pixel_noise * torch.randn(image.shape, generator=g)
    mask = alpha[:, 0] >= 0.5
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask


def render_shapes(cfg: ShapesConfig, progress: bool = False) -> ShapesArrays:
    """Render the split described by ``cfg`` (no caching; see :func:`load_shapes`)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.num_images
    # Class-balanced: every class appears floor or ceil of n/10 times, in random order.
    labels = (torch.arange(n) % len(SHAPE_CLASSES))[torch.randperm(n, generator=g)]
    bg_textures = torch.randint(len(TEXTURES), (n,), generator=g)
    if cfg.texture_mode == "match":
        textures = labels.clone()
    elif cfg.texture_mode == "conflict":
        textures = (labels + torch.randint(1, len(TEXTURES), (n,), generator=g)) % len(TEXTURES)
    else:
        textures = torch.randint(len(TEXTURES), (n,), generator=g)
    # The background never reuses the object's texture: the object must stay distinguishable.
    bg_textures = torch.where(bg_textures == textures, (bg_textures + 1) % len(TEXTURES), bg_textures)

    images = torch.empty(n, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    masks = torch.empty(n, cfg.image_size, cfg.image_size, dtype=torch.bool)
    starts = range(0, n, _CHUNK)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"rendering shapes ({n} images)", unit="chunk", leave=False)
    for start in starts:
        sl = slice(start, min(start + _CHUNK, n))
        images[sl], masks[sl] = _render_chunk(labels[sl], textures[sl], bg_textures[sl], cfg, g)
    return ShapesArrays(images, labels, masks, textures, bg_textures)


def default_cache_dir() -> Path:
    """Where rendered data sets are cached: ``$VITLAB_CACHE`` or ``~/.cache/vitlab``."""
    return Path(os.environ.get("VITLAB_CACHE") or Path.home() / ".cache" / "vitlab")


def load_shapes(cfg: ShapesConfig, cache: bool = True, progress: bool = False) -> ShapesArrays:
    """The split described by ``cfg``, from the on-disk cache when present, else rendered and cached.

    The cache holds plain ``.npz`` arrays (no pickles); a damaged cache file is re-rendered.
    """
    path = default_cache_dir() / "shapes" / f"{cfg.key()}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return ShapesArrays(*(torch.from_numpy(z[k]) for k in _FIELDS))
        except Exception:  # noqa: BLE001  (any damage means: render again)
            pass
    arrays = render_shapes(cfg, progress=progress)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, **{k: getattr(arrays, k).numpy() for k in _FIELDS})
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        except OSError:
            pass  # a read-only home directory only costs re-rendering next time
    return arrays


_FIELDS = ("images", "labels", "masks", "textures", "background_textures")

"""Draw the sample environment `data/scenes/teal_room/`: one synthetic room seen from five camera positions.

DreamBooth on an environment needs a few frames of one place. We own no photos of a place that we may share, so this
script draws one: a box-shaped room (teal walls, a terracotta-and-cream checkered floor, a round window, an orange
sofa, a red table, a yellow floor lamp, a potted plant, a purple striped rug and a painting of a sun), projected
through a pinhole camera from five viewpoints with flat shading. Run it from the repository root to redraw the frames:

    python data/scenes/draw_room.py

The output is deterministic (fixed seed for the sensor noise), 256x256 JPEG, each under 30 KB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT_DIR = Path(__file__).resolve().parent / "teal_room"
SIZE = 256
SUPERSAMPLE = 3  # draw at 3x and shrink: cheap anti-aliasing
NEAR = 0.05  # metres; polygons are clipped to the part in front of this plane

Vec = tuple[float, float, float]
Colour = tuple[int, int, int]

TEAL = (38, 122, 120)
CREAM = (236, 224, 196)
TERRACOTTA = (186, 92, 60)
ORANGE = (232, 128, 32)
RED = (178, 36, 40)
YELLOW = (246, 206, 60)
PURPLE = (108, 60, 140)
GREEN = (52, 132, 60)
BROWN = (110, 70, 40)
SKY = (150, 200, 240)
WHITE = (244, 242, 236)
DARK = (40, 36, 34)


@dataclass(frozen=True)
class Polygon:
    points: list[Vec]  # counter-clockwise seen from the side the normal points to
    colour: Colour


@dataclass(frozen=True)
class Camera:
    position: Vec
    yaw_degrees: float  # positive turns right
    pitch_degrees: float = 0.0  # positive looks up
    focal: float = 0.8  # focal length in image widths (about 64 degrees field of view)


# --------------------------------------------------------------------------------------------------------------------
# Scene: x to the right, y up, z into the room (metres). The room spans x -3..3, y 0..2.8, z 0..6.


def quad(a: Vec, b: Vec, c: Vec, d: Vec, colour: Colour) -> Polygon:
    return Polygon([a, b, c, d], colour)


def box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, colour: Colour) -> list[Polygon]:
    """The six faces of an axis-aligned box, each wound so that its normal points outwards."""
    return [
        quad((x0, y0, z0), (x0, y1, z0), (x1, y1, z0), (x1, y0, z0), colour),  # front (-z)
        quad((x1, y0, z1), (x1, y1, z1), (x0, y1, z1), (x0, y0, z1), colour),  # back (+z)
        quad((x0, y0, z1), (x0, y1, z1), (x0, y1, z0), (x0, y0, z0), colour),  # left (-x)
        quad((x1, y0, z0), (x1, y1, z0), (x1, y1, z1), (x1, y0, z1), colour),  # right (+x)
        quad((x0, y1, z0), (x0, y1, z1), (x1, y1, z1), (x1, y1, z0), colour),  # top (+y)
        quad((x0, y0, z1), (x0, y0, z0), (x1, y0, z0), (x1, y0, z1), colour),  # bottom (-y)
    ]


def disc_on_back_wall(cx: float, cy: float, z: float, radius: float, colour: Colour, sides: int = 32) -> Polygon:
    """A disc facing the camera (normal -z), as a polygon with `sides` corners."""
    angles = [2 * math.pi * k / sides for k in range(sides)]
    return Polygon([(cx - radius * math.cos(a), cy + radius * math.sin(a), z) for a in angles], colour)


def room_shell() -> list[Polygon]:
    """Walls and ceiling, wound to face into the room. Drawn first: nothing in the room is behind them."""
    return [
        quad((-3, 0, 6), (-3, 2.8, 6), (3, 2.8, 6), (3, 0, 6), TEAL),  # back wall
        quad((-3, 0, -1), (-3, 2.8, -1), (-3, 2.8, 6), (-3, 0, 6), TEAL),  # left wall
        quad((3, 0, 6), (3, 2.8, 6), (3, 2.8, -1), (3, 0, -1), TEAL),  # right wall
        quad((-3, 2.8, 6), (-3, 2.8, -1), (3, 2.8, -1), (3, 2.8, 6), WHITE),  # ceiling
    ]


def floor_tiles(tile: float = 0.75) -> list[Polygon]:
    tiles = []
    for i, x in enumerate(np.arange(-3, 3, tile)):
        for j, z in enumerate(np.arange(-1, 6, tile)):
            colour = CREAM if (i + j) % 2 else TERRACOTTA
            x1, z1 = min(x + tile, 3), min(z + tile, 6)
            tiles.append(quad((x, 0, z1), (x1, 0, z1), (x1, 0, z), (x, 0, z), colour))
    return tiles


def wall_decorations() -> list[Polygon]:
    """Flat things on the walls and floor, drawn right after the shell (slightly in front of their surface)."""
    window = [
        disc_on_back_wall(1.0, 1.7, 5.99, 0.62, DARK),
        disc_on_back_wall(1.0, 1.7, 5.98, 0.55, SKY),
        quad((0.97, 1.15, 5.97), (0.97, 2.25, 5.97), (1.03, 2.25, 5.97), (1.03, 1.15, 5.97), DARK),
        quad((0.45, 1.67, 5.97), (0.45, 1.73, 5.97), (1.55, 1.73, 5.97), (1.55, 1.67, 5.97), DARK),
    ]
    # A painting of a red sun over yellow hills on the left wall (facing +x).
    x = -2.99
    painting = [
        quad((x, 1.0, 2.4), (x, 2.0, 2.4), (x, 2.0, 3.8), (x, 1.0, 3.8), DARK),
        quad((x + 0.005, 1.06, 2.46), (x + 0.005, 1.94, 2.46), (x + 0.005, 1.94, 3.74), (x + 0.005, 1.06, 3.74), WHITE),
        quad((x + 0.01, 1.06, 2.46), (x + 0.01, 1.35, 2.46), (x + 0.01, 1.45, 3.74), (x + 0.01, 1.06, 3.74), YELLOW),
    ]
    sun = [(x + 0.01, 1.65 + 0.18 * math.sin(a), 3.1 + 0.18 * math.cos(a)) for a in np.linspace(2 * math.pi, 0, 24)]
    painting.append(Polygon(sun, RED))
    rug = [quad((-1.6, 0.01, 4.9), (1.2, 0.01, 4.9), (1.2, 0.01, 3.1), (-1.6, 0.01, 3.1), PURPLE)]
    for z in (3.4, 3.9, 4.4):  # cream stripes across the rug
        rug.append(quad((-1.6, 0.02, z + 0.15), (1.2, 0.02, z + 0.15), (1.2, 0.02, z), (-1.6, 0.02, z), CREAM))
    return window + painting + rug


def furniture() -> list[list[Polygon]]:
    """Solid objects, one face list each; objects are sorted by depth, faces inside one by back-face culling."""
    sofa = [
        box(-2.7, -0.7, 0.0, 0.45, 5.1, 5.9, ORANGE),
        box(-2.7, -0.7, 0.45, 1.05, 5.65, 5.9, ORANGE),
        box(-2.9, -2.7, 0.0, 0.7, 5.1, 5.9, ORANGE),
        box(-0.7, -0.5, 0.0, 0.7, 5.1, 5.9, ORANGE),
    ]
    table = [box(-2.0, -1.1, 0.35, 0.42, 4.0, 4.6, RED)] + [
        box(x, x + 0.06, 0.0, 0.35, z, z + 0.06, DARK) for x in (-1.98, -1.18) for z in (4.02, 4.52)
    ]
    lamp = [
        box(1.9, 2.2, 0.0, 0.04, 5.15, 5.45, DARK),
        box(2.02, 2.08, 0.04, 1.7, 5.27, 5.33, DARK),
        box(1.8, 2.3, 1.6, 2.0, 5.05, 5.55, YELLOW),
    ]
    plant = [
        box(2.2, 2.7, 0.0, 0.5, 3.6, 4.1, BROWN),
        box(2.15, 2.75, 0.5, 1.1, 3.55, 4.15, GREEN),
        box(2.3, 2.6, 1.1, 1.4, 3.7, 4.0, GREEN),
    ]
    return [[face for part in thing for face in part] for thing in (sofa, table, lamp, plant)]


# --------------------------------------------------------------------------------------------------------------------
# Camera: world -> camera space -> clip at the near plane -> pixels.


def to_camera(points: np.ndarray, camera: Camera) -> np.ndarray:
    yaw, pitch = math.radians(camera.yaw_degrees), math.radians(camera.pitch_degrees)
    shifted = points - np.asarray(camera.position)
    # Undo the camera's yaw (about y), then its pitch (about x).
    cos_y, sin_y = math.cos(yaw), math.sin(yaw)
    x = cos_y * shifted[:, 0] - sin_y * shifted[:, 2]
    z = sin_y * shifted[:, 0] + cos_y * shifted[:, 2]
    cos_p, sin_p = math.cos(pitch), math.sin(pitch)
    y = cos_p * shifted[:, 1] - sin_p * z
    z = sin_p * shifted[:, 1] + cos_p * z
    return np.stack([x, y, z], axis=1)


def clip_near(points: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clipping of a polygon against the plane z = NEAR (keeps z >= NEAR)."""
    kept = []
    for current, following in zip(points, np.roll(points, -1, axis=0), strict=True):
        if current[2] >= NEAR:
            kept.append(current)
        if (current[2] >= NEAR) != (following[2] >= NEAR):
            t = (NEAR - current[2]) / (following[2] - current[2])
            kept.append(current + t * (following - current))
    return np.array(kept)


def shade(colour: Colour, normal: np.ndarray, depth: float) -> tuple[int, int, int]:
    """Lambert-like shading from a light above the viewer's left, plus a little darkening with distance."""
    light = np.array([-0.4, 0.8, -0.45])
    light /= np.linalg.norm(light)
    brightness = 0.55 + 0.45 * abs(float(normal @ light))
    brightness *= 1.0 - min(depth, 8.0) * 0.025
    return tuple(int(min(255, c * brightness)) for c in colour)


def render(camera: Camera, layers: list[list[Polygon]], objects: list[list[Polygon]]) -> Image.Image:
    side = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side), DARK)
    draw = ImageDraw.Draw(image)
    focal = camera.focal * side

    def draw_polygon(polygon: Polygon) -> None:
        world = np.asarray(polygon.points, dtype=float)
        normal = np.cross(world[1] - world[0], world[2] - world[0])
        normal /= np.linalg.norm(normal)
        points = to_camera(world, camera)
        # Back-face culling: the face points away when its normal and the view ray agree.
        if float(normal @ (world[0] - np.asarray(camera.position))) > 0:
            return
        points = clip_near(points)
        if len(points) < 3:
            return
        pixels = [(side / 2 + focal * x / z, side / 2 - focal * y / z) for x, y, z in points]
        draw.polygon(pixels, fill=shade(polygon.colour, normal, float(points[:, 2].mean())))

    for layer in layers:
        for polygon in layer:
            draw_polygon(polygon)

    def centre_depth(thing: list[Polygon]) -> float:
        points = np.concatenate([np.asarray(p.points, dtype=float) for p in thing])
        return float(to_camera(points.mean(axis=0, keepdims=True), camera)[0, 2])

    for thing in sorted(objects, key=centre_depth, reverse=True):  # painter's algorithm: far objects first
        for polygon in thing:
            draw_polygon(polygon)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def add_sensor_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight blur and grain, so the frames are not perfectly flat colour (as a real photo would not be)."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32)
    pixels += rng.normal(0.0, 4.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


CAMERAS = [
    Camera((0.0, 1.5, 0.2), 0.0, -4.0),
    Camera((-2.0, 1.4, 0.8), 32.0, -6.0),
    Camera((2.2, 1.6, 0.6), -48.0, -8.0),
    Camera((0.6, 1.2, 2.4), -12.0, 2.0),
    Camera((-1.0, 1.8, 1.6), 10.0, -10.0),
]


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    layers = [room_shell(), floor_tiles(), wall_decorations()]
    objects = furniture()
    for index, camera in enumerate(CAMERAS):
        frame = add_sensor_noise(render(camera, layers, objects), rng)
        path = OUT_DIR / f"{index:02d}.jpg"
        frame.save(path, quality=85, optimize=True)
        print(f"{path}: {path.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()

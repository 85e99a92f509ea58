#!/usr/bin/env python3
"""Draws the Teams app icons (color.png 192x192, outline.png 32x32 white on transparent) that
`flotilla chat teams package` zips; standard library only. Run from this folder to redraw."""
import struct
import zlib


def inside(x, y):
    """The boat in unit coordinates: two sails either side of a mast, and a hull."""
    def tri(ax, ay, bx, by, cx, cy):
        d = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
        a = ((by - cy) * (x - cx) + (cx - bx) * (y - cy)) / d
        b = ((cy - ay) * (x - cx) + (ax - cx) * (y - cy)) / d
        return a >= 0 and b >= 0 and a + b <= 1
    main = tri(0.53, 0.14, 0.53, 0.64, 0.84, 0.64)
    jib = tri(0.47, 0.24, 0.47, 0.64, 0.20, 0.64)
    mast = 0.475 <= x <= 0.525 and 0.12 <= y <= 0.70
    t = (y - 0.70) / 0.13
    hull = 0 <= t <= 1 and 0.14 + 0.10 * t <= x <= 0.86 - 0.10 * t
    return main or jib or mast or hull


def png(size, pixel):
    rows = b"".join(
        b"\x00" + b"".join(pixel((i + 0.5) / size, (j + 0.5) / size) for i in range(size))
        for j in range(size)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


BLUE = bytes([0x1F, 0x5F, 0xB8, 0xFF])
WHITE = bytes([0xFF, 0xFF, 0xFF, 0xFF])
CLEAR = bytes([0xFF, 0xFF, 0xFF, 0x00])

with open("color.png", "wb") as f:
    f.write(png(192, lambda x, y: WHITE if inside(x, y) else BLUE))
with open("outline.png", "wb") as f:
    f.write(png(32, lambda x, y: WHITE if inside(x, y) else CLEAR))

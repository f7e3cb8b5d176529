"""Compiled kernels that reproduce Pillow's AugMix operations byte for byte.

Every function here mirrors the arithmetic of the Pillow C code that the reference
implementation calls (``libImaging/Geometry.c`` bilinear affine transform, ``ImageOps``
look-up tables, ``Blend.c``, the 3x3 ``SMOOTH`` filter, ``L24`` grey conversion), operation
for operation and in the same precision, so the output bytes are identical. The kernels are
compiled with numba (no fast-math, so no re-association or fused multiply-add) and cached on
disk.

Images are C-contiguous ``uint8`` arrays of shape ``(height, width, 3)``. Each operation
takes a row of six ``float64`` parameters: the affine matrix for the geometric operations,
the concrete value in ``params[0]`` for the others (see :func:`augserver.ops.op_params`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from augserver.op_names import OP_CODES

# Kernel codes, as compile-time constants for numba.
AUTOCONTRAST = OP_CODES["autocontrast"]
EQUALIZE = OP_CODES["equalize"]
POSTERIZE = OP_CODES["posterize"]
ROTATE = OP_CODES["rotate"]
SOLARIZE = OP_CODES["solarize"]
SHEAR_X = OP_CODES["shear_x"]
SHEAR_Y = OP_CODES["shear_y"]
TRANSLATE_X = OP_CODES["translate_x"]
TRANSLATE_Y = OP_CODES["translate_y"]
COLOR = OP_CODES["color"]
CONTRAST = OP_CODES["contrast"]
BRIGHTNESS = OP_CODES["brightness"]
SHARPNESS = OP_CODES["sharpness"]

# Pillow divides the integer SMOOTH kernel by its scale in float32 (``_imaging.c``).
_SMOOTH_SIDE = np.float32(1.0) / np.float32(13.0)
_SMOOTH_CENTRE = np.float32(5.0) / np.float32(13.0)
_HALF32 = np.float32(0.5)
_ZERO32 = np.float32(0.0)
_ONE32 = np.float32(1.0)
_MAX32 = np.float32(255.0)


@njit(cache=True)
def _copy(src, dst):
    """``dst[...] = src`` as a flat loop (numba's n-d slice assignment is far slower)."""
    s = src.reshape(-1)
    d = dst.reshape(-1)
    for i in range(s.size):
        d[i] = s[i]


@njit(cache=True)
def _fill(dst, value):
    d = dst.reshape(-1)
    for i in range(d.size):
        d[i] = value


@njit(cache=True)
def _pixels(image):
    """The image as a ``(pixels, 3)`` view; loops over it index with a non-negative range
    variable, which spares numba's negative-index checks (about 2x on these loops)."""
    return image.reshape(-1, 3)


@njit(cache=True)
def _histograms(src):
    hist = np.zeros((3, 256), np.int64)
    h0, h1, h2 = hist[0], hist[1], hist[2]
    s = _pixels(src)
    for p in range(s.shape[0]):
        h0[s[p, 0]] += 1
        h1[s[p, 1]] += 1
        h2[s[p, 2]] += 1
    return hist


@njit(cache=True)
def _apply_lut(src, dst, lut):
    s = _pixels(src)
    d = _pixels(dst)
    l0, l1, l2 = lut[0], lut[1], lut[2]
    for p in range(s.shape[0]):
        d[p, 0] = l0[s[p, 0]]
        d[p, 1] = l1[s[p, 1]]
        d[p, 2] = l2[s[p, 2]]


@njit(cache=True)
def _identity_row(lut, c):
    for i in range(256):
        lut[c, i] = i


@njit(cache=True)
def _autocontrast(src, dst):
    """``ImageOps.autocontrast(img)`` with cutoff 0: stretch each band to 0..255."""
    hist = _histograms(src)
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        lo = 0
        while lo < 255 and hist[c, lo] == 0:
            lo += 1
        hi = 255
        while hi > 0 and hist[c, hi] == 0:
            hi -= 1
        if hi <= lo:
            _identity_row(lut, c)
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        for i in range(256):
            v = int(i * scale + offset)
            lut[c, i] = min(max(v, 0), 255)
    _apply_lut(src, dst, lut)


@njit(cache=True)
def _equalize(src, dst):
    """``ImageOps.equalize(img)``: per-band histogram equalisation with Pillow's rounding."""
    hist = _histograms(src)
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        nonzero = 0
        total = 0
        last = 0
        for i in range(256):
            if hist[c, i]:
                nonzero += 1
                total += hist[c, i]
                last = hist[c, i]
        step = (total - last) // 255 if nonzero > 1 else 0
        if step == 0:
            _identity_row(lut, c)
            continue
        n = step // 2
        for i in range(256):
            lut[c, i] = min(n // step, 255)  # Image.point clips with CLIP8
            n += hist[c, i]
    _apply_lut(src, dst, lut)


@njit(cache=True)
def _posterize(src, dst, bits):
    """``ImageOps.posterize``: its table ``i & ~(2**(8 - bits) - 1)``, as a mask."""
    mask = np.uint8(~((1 << (8 - bits)) - 1) & 0xFF)
    s = src.reshape(-1)
    d = dst.reshape(-1)
    for i in range(s.size):
        d[i] = s[i] & mask


@njit(cache=True)
def _solarize(src, dst, threshold):
    """``ImageOps.solarize``: its table ``i if i < threshold else 255 - i``, elementwise."""
    s = src.reshape(-1)
    d = dst.reshape(-1)
    for i in range(s.size):
        v = s[i]
        d[i] = v if np.int64(v) < threshold else np.uint8(255) - v


@njit(cache=True)
def _affine_bilinear(src, dst, p):
    """``img.transform(size, AFFINE, p, BILINEAR)`` with black fill (Pillow's generic path).

    Output pixel (x, y) samples the input at ``(a*x' + b*y' + c, d*x' + e*y' + f)`` with
    ``x' = x + 0.5``, interpolated bilinearly in double precision and truncated to uint8.
    Where a fractional offset is exactly 0 its interpolation step is skipped: Pillow's
    ``v1 + (v2 - v1) * 0.0`` is exactly ``v1``, so the bytes do not change.
    """
    h, w, _ = src.shape
    a0, a1, a2, a3, a4, a5 = p[0], p[1], p[2], p[3], p[4], p[5]
    if a0 == 1.0 and a1 == 0.0 and a3 == 0.0 and a4 == 1.0 and a2 == int(a2) and a5 == int(a5):
        _shift(src, dst, int(a2), int(a5))
        return
    for y in range(h):
        yc = y + 0.5
        for x in range(w):
            xc = x + 0.5
            xin = a0 * xc + a1 * yc + a2
            yin = a3 * xc + a4 * yc + a5
            if xin < 0.0 or xin >= w or yin < 0.0 or yin >= h:
                dst[y, x, 0] = 0
                dst[y, x, 1] = 0
                dst[y, x, 2] = 0
                continue
            xin -= 0.5
            yin -= 0.5
            xi = math.floor(xin)
            yi = math.floor(yin)
            dx = xin - xi
            dy = yin - yi
            x0 = min(max(xi, 0), w - 1)
            x1 = min(max(xi + 1, 0), w - 1)
            r0 = src[min(max(yi, 0), h - 1)]
            if dy == 0.0 or yi + 1 >= h:
                # v2 = v1 (no second row) or a zero weight: one horizontal interpolation.
                for c in range(3):
                    p0 = np.int64(r0[x0, c])
                    dst[y, x, c] = np.uint8(int(p0 + (np.int64(r0[x1, c]) - p0) * dx))
                continue
            r1 = src[yi + 1]
            if dx == 0.0:
                for c in range(3):
                    v1 = np.float64(r0[x0, c])
                    dst[y, x, c] = np.uint8(int(v1 + (np.float64(r1[x0, c]) - v1) * dy))
                continue
            for c in range(3):
                p0 = np.int64(r0[x0, c])
                v1 = p0 + (np.int64(r0[x1, c]) - p0) * dx
                q0 = np.int64(r1[x0, c])
                v2 = q0 + (np.int64(r1[x1, c]) - q0) * dx
                dst[y, x, c] = np.uint8(int(v1 + (v2 - v1) * dy))


@njit(cache=True)
def _shift(src, dst, tx, ty):
    """The affine transform for a whole-pixel translation: a copy, black where uncovered."""
    h, w, _ = src.shape
    _fill(dst, 0)
    x_lo, x_hi = max(0, -tx), min(w, w - tx)
    if x_lo >= x_hi:
        return
    s = src.reshape(-1)
    d = dst.reshape(-1)
    span = 3 * (x_hi - x_lo)
    for y in range(max(0, -ty), min(h, h - ty)):
        out = 3 * (y * w + x_lo)
        inp = 3 * ((y + ty) * w + x_lo + tx)
        _copy(s[inp : inp + span], d[out : out + span])


@njit(cache=True)
def _blend(degenerate, src, dst, alpha):
    """``Image.blend(degenerate, src, alpha)`` in float32, as ``ImagingBlend`` computes it."""
    h, w, _ = src.shape
    if alpha == _ZERO32:
        _copy(degenerate, dst)
        return
    if alpha == _ONE32:
        _copy(src, dst)
        return
    interpolate = alpha >= _ZERO32 and alpha <= _ONE32
    for y in range(h):
        for x in range(w):
            for c in range(3):
                a = np.int32(degenerate[y, x, c])
                t = np.float32(a) + alpha * np.float32(np.int32(src[y, x, c]) - a)
                if interpolate:
                    dst[y, x, c] = np.uint8(int(t))
                elif t <= _ZERO32:
                    dst[y, x, c] = 0
                elif t >= _MAX32:
                    dst[y, x, c] = 255
                else:
                    dst[y, x, c] = np.uint8(int(t))


@njit(cache=True)
def _grey(r, g, b):
    """Pillow's RGB to L conversion (ITU-R 601-2 luma, 16-bit fixed point)."""
    return (np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 0x8000) >> 16


@njit(cache=True)
def _color(src, dst, scratch, alpha):
    h, w, _ = src.shape
    for y in range(h):
        for x in range(w):
            v = np.uint8(_grey(src[y, x, 0], src[y, x, 1], src[y, x, 2]))
            scratch[y, x, 0] = v
            scratch[y, x, 1] = v
            scratch[y, x, 2] = v
    _blend(scratch, src, dst, alpha)


@njit(cache=True)
def _contrast(src, dst, scratch, alpha):
    h, w, _ = src.shape
    total = 0
    for y in range(h):
        for x in range(w):
            total += _grey(src[y, x, 0], src[y, x, 1], src[y, x, 2])
    mean = int(total / (h * w) + 0.5)
    _fill(scratch, np.uint8(mean))
    _blend(scratch, src, dst, alpha)


@njit(cache=True)
def _brightness(src, dst, scratch, alpha):
    _fill(scratch, 0)
    _blend(scratch, src, dst, alpha)


@njit(cache=True)
def _smooth_row(row, x, c, middle):
    """One kernel row: ``(left, middle, right)`` weights ``(1, middle, 1) / 13``, in float32."""
    return (
        np.float32(row[x - 1, c]) * _SMOOTH_SIDE
        + np.float32(row[x, c]) * middle
        + np.float32(row[x + 1, c]) * _SMOOTH_SIDE
    )


@njit(cache=True)
def _smooth(src, dst):
    """``img.filter(ImageFilter.SMOOTH)``: 3x3 kernel in float32, border pixels copied."""
    h, w, _ = src.shape
    _copy(src, dst)
    for y in range(1, h - 1):
        above = src[y - 1]
        row = src[y]
        below = src[y + 1]
        for x in range(1, w - 1):
            for c in range(3):
                ss = _HALF32
                ss += _smooth_row(below, x, c, _SMOOTH_SIDE)
                ss += _smooth_row(row, x, c, _SMOOTH_CENTRE)
                ss += _smooth_row(above, x, c, _SMOOTH_SIDE)
                ss = min(max(ss, _ZERO32), _MAX32)
                dst[y, x, c] = np.uint8(int(ss))


@njit(cache=True)
def _sharpness(src, dst, scratch, alpha):
    _smooth(src, scratch)
    _blend(scratch, src, dst, alpha)


@njit(cache=True)
def apply_op(code, p, src, dst, scratch):
    """Apply operation ``code`` with parameter row ``p`` from ``src`` into ``dst``.

    ``scratch`` is a third image-sized buffer used by the enhance operations.
    """
    if code == AUTOCONTRAST:
        _autocontrast(src, dst)
    elif code == EQUALIZE:
        _equalize(src, dst)
    elif code == POSTERIZE:
        _posterize(src, dst, int(p[0]))
    elif code == SOLARIZE:
        _solarize(src, dst, int(p[0]))
    elif code <= TRANSLATE_Y:
        _affine_bilinear(src, dst, p)
    elif code == COLOR:
        _color(src, dst, scratch, np.float32(p[0]))
    elif code == CONTRAST:
        _contrast(src, dst, scratch, np.float32(p[0]))
    elif code == BRIGHTNESS:
        _brightness(src, dst, scratch, np.float32(p[0]))
    else:
        _sharpness(src, dst, scratch, np.float32(p[0]))


@njit(cache=True, nogil=True)
def mix_views(orig, codes, params, chain_lengths, weights, skips, out):
    """Run AugmentAndMix programs for ``len(skips)`` views of one image.

    ``codes``/``params`` list every operation of every chain in order; ``chain_lengths`` has
    ``views * width`` entries; ``weights`` is ``(views, width)`` (Dirichlet); ``skips`` holds
    each view's Beta weight ``m``. Chains are mixed in float64 and the view
    ``(1 - m) * orig + m * sum(w_i * chain_i)`` is rounded to nearest into ``out[view]``.
    ``out`` is ``(views, H * W * 3)``: each view's pixels contiguous, the views themselves
    possibly a stride apart (a sample's slot in a batch buffer). The GIL is released while it
    runs.
    """
    h, w, _ = orig.shape
    views, width = weights.shape
    acc = np.empty(h * w * 3, np.float64)
    orig_flat = orig.reshape(-1)
    ping = np.empty_like(orig)
    pong = np.empty_like(orig)
    scratch = np.empty_like(orig)
    k = 0
    for v in range(views):
        _fill(acc, 0.0)
        for i in range(width):
            # The first operation reads the original; later ones alternate two buffers.
            apply_op(codes[k], params[k], orig, ping, scratch)
            k += 1
            cur = ping
            for j in range(1, chain_lengths[v * width + i]):
                nxt = pong if j % 2 == 1 else ping
                apply_op(codes[k], params[k], cur, nxt, scratch)
                cur = nxt
                k += 1
            wi = weights[v, i]
            c_flat = cur.reshape(-1)
            for j in range(acc.size):
                acc[j] += wi * c_flat[j]
        m = skips[v]
        keep = 1.0 - m
        o_flat = out[v]
        for j in range(acc.size):
            mixed = keep * orig_flat[j] + m * acc[j]
            o_flat[j] = np.uint8(min(max(math.floor(mixed + 0.5), 0.0), 255.0))

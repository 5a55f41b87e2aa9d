"""What the Newton–Schulz kernels ask of a GPU: on-chip limits, tiled launch settings, and the
shared memory each tiled kernel takes against what each architecture has.

Plain Python, no triton import: `mango.ns_engine` reads it to choose engines and tile sizes
(also where triton is not installed), `mango_kernels.ns_batch` launches with these settings, and
`mango_kernels.aot` checks compiled kernels against the same per-architecture limits.

Shared memory of the tiled kernels, as Triton's compiler allocates it (`aot.compile_launches`
reports it; tests/test_aot.py compiles the tile sizes `mango.ns_engine` picks on each architecture
and holds this model to the compiler's numbers). Per stage the software pipeline keeps one copy of
each loaded operand tile (`ns_xxt`: two BM×BK tiles of X; `ns_update`: a BM×BK tile of M and a
BK×BN tile of X, both in the NS dtype): `TILED_STAGES` copies where the tensor cores read their
operands from shared memory (wgmma: sm_90 and later, 16-bit operands, BM ≥ 64), one fewer
elsewhere (mma.sync, or fp32 operands). With wgmma, `ns_xxt`'s mirrored store of its fp32
BM×BM tile goes through shared memory too (the larger of the two counts: the buffers are reused).
`ns_poly` loads the fp32 Gram matrix (two BM×BK fp32 tiles per stage, `TILED_STAGES − 1`
copies) and stages the two operands it rounds to the NS dtype once more.
"""

from __future__ import annotations

# Largest dynamic shared memory one block may use, bytes, by target (CUDA guide, opt-in maximum)
SHARED_MEMORY = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448, "sm_100": 232448, "sm_120": 101376}

# Rows (of an item's wide orientation) up to which the on-chip kernels hold an item: the textbook
# form keeps A and M (fp32, rows²) in registers, the Gram form R, Q and P
ON_CHIP_MAX_ROWS = {"textbook": 128, "gram": 64}

TILED_WARPS = 8  # num_warps of the tiled kernels
TILED_STAGES = 3  # num_stages of the tiled kernels

TILED_KERNELS = {"textbook": ("ns_xxt", "ns_poly", "ns_update"), "gram": ("ns_xxt", "ns_update")}


def arch_number(arch: str) -> int:
    """90 for "sm_90"."""
    return int(arch.removeprefix("sm_"))


def _wgmma(arch: str, itemsize: int, bm: int) -> bool:
    """Whether the tiled kernels' dots read their operands from shared memory (see the module docstring)."""
    return arch_number(arch) >= 90 and itemsize == 2 and bm >= 64


def tiled_shared_memory(kernel: str, tiles, itemsize: int, arch: str) -> int:
    """Bytes of shared memory the tiled kernel `kernel` takes at `tiles` (BM, BN, BK) with operands
    of `itemsize` bytes on `arch` (e.g. "sm_90")."""
    bm, bn, bk = tiles
    wgmma = _wgmma(arch, itemsize, bm)
    copies = TILED_STAGES if wgmma else TILED_STAGES - 1
    if kernel == "ns_xxt":
        return max(copies * 2 * bm * bk * itemsize, bm * bm * 4 if wgmma else 0)
    if kernel == "ns_update":
        return copies * (bm * bk + bk * bn) * itemsize
    if kernel == "ns_poly":
        return (TILED_STAGES - 1) * 2 * bm * bk * 4 + 2 * bm * bk * itemsize
    raise ValueError(f"mango_kernels: no tiled NS kernel named {kernel!r}; they are {TILED_KERNELS['textbook']}")


def tiles_shared_memory(tiles, itemsize: int, arch: str, method: str = "textbook") -> int:
    """The most shared memory any tiled kernel of the `method` form takes at `tiles`."""
    return max(tiled_shared_memory(k, tiles, itemsize, arch) for k in TILED_KERNELS[method])


def fit_tiles(tiles, arch: str, itemsize: int, method: str = "textbook") -> tuple:
    """`tiles`, halved until every tiled kernel of the form fits `arch`'s shared memory (an
    architecture not listed gets the smallest limit listed): each time along the largest side
    (BN first among equals, then BM, then BK) whose halving makes the largest kernel smaller;
    no side goes below 16."""
    tiles = tuple(tiles)
    limit = SHARED_MEMORY.get(arch, min(SHARED_MEMORY.values()))
    need = tiles_shared_memory(tiles, itemsize, arch, method)
    while need > limit:
        for side in sorted((1, 0, 2), key=lambda i: -tiles[i]):  # stable: BN, BM, BK among equals
            halved = tuple(t // 2 if i == side else t for i, t in enumerate(tiles))
            smaller = tiles_shared_memory(halved, itemsize, arch, method)
            if tiles[side] > 16 and smaller < need:
                tiles, need = halved, smaller
                break
        else:
            raise ValueError(f"mango_kernels: no tile sizes from {tiles} fit {limit} B of shared memory on {arch}")
    return tiles

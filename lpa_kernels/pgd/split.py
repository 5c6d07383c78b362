"""When ``pgd_step`` runs over a (feature block, class) grid instead of one program per class, for both
fast backends (the scheme: ``triton_kernels.py``'s module doc; ``csrc/pgd.cu`` follows it)."""

from __future__ import annotations

# The split grid's feature blocks: the smallest still moves a few hundred bytes per program, the largest
# is one pass of the one-program-per-class update.
SPLIT_BLOCKS = (64, 1024)
# Partials per (class, block) of the split grid's first phase, in this order: largest |g|,
# sum (g / largest)^2, sum delta * g / largest, sum delta^2, any g != 0, any g not finite (1 or 0).
N_STATS = 6


def split_block(num_classes: int, width: int, programs: int) -> int | None:
    """The feature block of ``pgd_step``'s (feature block, class) grid for ``num_classes`` rows of
    ``width`` entries, or None for one program per class. The split pays when the classes are fewer
    than the ``programs`` that fill the device (2 per multiprocessor) and a row spans several blocks;
    the block is then the largest power of two in ``SPLIT_BLOCKS`` that still gives that many programs
    (K = 10, D = 4096 on an H100's 132 multiprocessors: 128 entries, 320 programs)."""
    if num_classes >= programs:
        return None
    share = max(num_classes * width // programs, 1)
    block = min(SPLIT_BLOCKS[1], max(SPLIT_BLOCKS[0], 1 << (share.bit_length() - 1)))
    return block if width > block else None

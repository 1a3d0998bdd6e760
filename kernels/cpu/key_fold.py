"""Folding 16 keys' vectors of partial sums into one vector of 16 scores, for intrinsics' codegen.

A decode kernel that multiplies each key's row as it is stored ends with 16 vectors of 16 lane-wise
partial sums, one per key. Instead of 16 horizontal sums, they are folded pairwise in a tree of
shuffles and adds: 15 steps give one vector whose lanes are the 16 keys' totals, put back in key
order by one more shuffle (``attention_dpbf16``: float sums; ``attention_vnni_int8``: int32 sums).
"""
from __future__ import annotations

from llvmlite import ir

KEYS = 16  # keys folded into one vector of scores


def fold_masks(w: int) -> tuple[list[int], list[int]]:
    """Shuffle masks folding vectors ``a``, ``b`` at width ``w``: lanes ``[2w j, 2w j + w)`` get a's
    lanes ``l`` + ``l + w`` of that group, lanes ``[2w j + w, 2w (j + 1))`` get b's the same way."""
    first, second = [], []
    for lane in range(16):
        g, r = lane - lane % (2 * w), lane % (2 * w)
        first.append(g + r if r < w else 16 + g + r - w)
        second.append(g + r + w if r < w else 16 + g + r)
    return first, second


def fold_tree(leaves, fold):
    """Fold 16 leaves pairwise as a binary counter (each pair as soon as it exists, so few vectors
    are live at once); ``fold(a, b, w)`` combines two vectors of one level at width ``w``."""
    stack: list[tuple[int, object]] = []
    for leaf in leaves:
        level, value = 0, leaf
        while stack and stack[-1][0] == level:
            _, a = stack.pop()
            value = fold(a, value, 8 >> level)
            level += 1
        stack.append((level, value))
    assert len(stack) == 1 and stack[0][0] == 4
    return stack[0][1]


def key_order() -> list[int]:
    """Which key's score each lane of the folded vector holds."""
    def fold(a, b, w):
        m1, _ = fold_masks(w)
        return [(a + b)[i] for i in m1]

    return fold_tree([[k] * 16 for k in range(KEYS)], fold)


def emit_folded_scores(builder, leaves, add):
    """For codegen: the 16 leaf vectors (key ``j``'s partial sums in ``leaves[j]``) folded into one
    vector of their totals in key order; ``add`` is ``builder.fadd`` or ``builder.add``."""
    i32 = ir.IntType(32)

    def fold(a, b, w):
        m1, m2 = (ir.Constant(ir.VectorType(i32, 16), m) for m in fold_masks(w))
        return add(builder.shuffle_vector(a, b, m1), builder.shuffle_vector(a, b, m2))

    folded = fold_tree(leaves, fold)
    order = key_order()
    natural = ir.Constant(ir.VectorType(i32, 16), [order.index(k) for k in range(KEYS)])
    return builder.shuffle_vector(folded, folded, natural)

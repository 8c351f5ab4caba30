"""Merkle tree hashing, inclusion and consistency proofs as defined by RFC 6962 section 2.1 (RFC 9162 2.1).

Leaf hash ``SHA-256(0x00 || data)``, node hash ``SHA-256(0x01 || left || right)``; the Merkle Tree Hash of n
leaves splits at k, the largest power of two smaller than n. Proofs are generated with the PATH and PROOF /
SUBPROOF definitions of RFC 6962 2.1.1-2.1.2 and verified with the algorithms of RFC 9162 2.1.3.2 and 2.1.4.2.
Hashes are 32-byte ``bytes`` throughout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The compact state of an append-only Merkle tree: the roots of its perfect subtrees, largest first.

    Appending is amortised O(1) hashes and the root is O(log n), so a writer never re-reads the log.
    """

    __slots__ = ("size", "hashes")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a frontier of {size} leaves has {bin(size).count('1')} subtree roots")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf: bytes) -> None:
        h, n, stack = leaf, self.size, self.hashes
        while n & 1:
            h = hashlib.sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = hashlib.sha256(b"\x01" + h + r).digest()
        return r

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes."""
    f = Frontier()
    for leaf in leaves:
        f.append(leaf)
    return f.root()


class MerkleTree:
    """A fixed list of leaf hashes, for Merkle roots and proofs over any prefix of it.

    Proof generation hashes each sibling subtree once, O(n) in all, and keeps nothing but the leaves.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.leaves = list(leaves)

    @property
    def size(self) -> int:
        return len(self.leaves)

    def _mth(self, lo: int, hi: int) -> bytes:
        return root(self.leaves[lo:hi])

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check(size)
        return self._mth(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 6962 2.1.1."""
        size = self.size if size is None else size
        self._check(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of size {size}")
        return self._path(index, 0, size)

    def _path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return self._path(m, lo, lo + k) + [self._mth(lo + k, hi)]
        return self._path(m - k, lo + k, hi) + [self._mth(lo, lo + k)]

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[0:second]) of RFC 6962 2.1.2 (empty when first is 0 or equal to second)."""
        second = self.size if second is None else second
        self._check(second)
        if not 0 <= first <= second:
            raise ValueError(f"no consistency proof from size {first} to size {second}")
        if first == 0 or first == second:
            return []
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [self._mth(lo, hi)]
        k = _split(n)
        if m <= k:
            return self._subproof(m, lo, lo + k, complete) + [self._mth(lo + k, hi)]
        return self._subproof(m - k, lo + k, hi, False) + [self._mth(lo, lo + k)]

    def _check(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes) -> bool:
    """RFC 9162 2.1.3.2: does `proof` show that `leaf` is leaf `index` of the tree (size, root_hash)?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: does `proof` show tree (first, first_root) is a prefix of (second, second_root)?"""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0

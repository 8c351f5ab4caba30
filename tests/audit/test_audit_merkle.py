"""Merkle tree hashing and proofs against RFC 6962 section 2.1, known answers and exhaustive small trees."""

from __future__ import annotations

import hashlib
import random

import pytest

from audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleTree,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# Reference vectors of the Certificate Transparency implementations (leaf inputs and MTH for sizes 1..8).
CT_INPUTS = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# A reference written straight from the RFC 6962 2.1 text, independent of the module under test.
def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return H(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def test_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"abc") == H(b"\x00abc")
    assert node_hash(b"L" * 32, b"R" * 32) == H(b"\x01" + b"L" * 32 + b"R" * 32)
    assert EMPTY_ROOT == H(b"") == root([])


def test_hand_computed_three_leaf_tree() -> None:
    l0, l1, l2 = (H(b"\x00" + x) for x in (b"a", b"b", b"c"))
    n01 = H(b"\x01" + l0 + l1)
    expected = H(b"\x01" + n01 + l2)  # k = 2 for n = 3: the left subtree is perfect, the right is leaf c
    tree = MerkleTree([l0, l1, l2])
    assert tree.root() == expected
    assert tree.root(2) == n01
    assert tree.root(1) == l0
    assert tree.inclusion_proof(2) == [n01]
    assert tree.inclusion_proof(0) == [l1, l2]
    assert tree.inclusion_proof(1) == [l0, l2]
    assert tree.consistency_proof(2) == [l2]
    assert tree.consistency_proof(1) == [l1, l2]
    assert verify_inclusion(l2, 2, 3, [n01], expected)
    assert verify_consistency(2, 3, n01, expected, [l2])
    assert verify_consistency(1, 3, l0, expected, [l1, l2])


def test_certificate_transparency_vectors() -> None:
    leaves = [leaf_hash(x) for x in CT_INPUTS]
    tree = MerkleTree(leaves)
    assert tree.root(0) == EMPTY_ROOT
    for n in range(1, 9):
        assert tree.root(n).hex() == CT_ROOTS[n - 1]
        assert root(leaves[:n]).hex() == CT_ROOTS[n - 1]
    for (index, size), path in CT_INCLUSION.items():
        assert [p.hex() for p in tree.inclusion_proof(index, size)] == path
        assert verify_inclusion(
            leaves[index], index, size, [bytes.fromhex(p) for p in path], bytes.fromhex(CT_ROOTS[size - 1])
        )
    for (first, second), path in CT_CONSISTENCY.items():
        assert [p.hex() for p in tree.consistency_proof(first, second)] == path
        assert verify_consistency(
            first,
            second,
            bytes.fromhex(CT_ROOTS[first - 1]),
            bytes.fromhex(CT_ROOTS[second - 1]),
            [bytes.fromhex(p) for p in path],
        )


def _flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8 % 32] ^= 1 << (bit % 8)
    return bytes(b)


@pytest.mark.parametrize("seed", [1, 2])
def test_every_inclusion_proof_up_to_40_verifies_and_tampering_fails(seed: int) -> None:
    rng = random.Random(seed)
    data = [rng.randbytes(rng.randrange(0, 40)) for _ in range(40)]
    leaves = [leaf_hash(x) for x in data]
    tree = MerkleTree(leaves)
    for n in range(1, 41):
        r = tree.root(n)
        assert r == ref_mth(data[:n])
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == ref_path(m, data[:n])
            assert verify_inclusion(leaves[m], m, n, proof, r)
            assert not verify_inclusion(_flip(leaves[m], rng.randrange(256)), m, n, proof, r)
            assert not verify_inclusion(leaves[m], m, n, proof, _flip(r, rng.randrange(256)))
            for i in range(len(proof)):
                bad = list(proof)
                bad[i] = _flip(bad[i], rng.randrange(256))
                assert not verify_inclusion(leaves[m], m, n, bad, r)
            if proof:
                assert not verify_inclusion(leaves[m], m, n, proof[:-1], r)
            assert not verify_inclusion(leaves[m], m, n, proof + [leaves[0]], r)
            if n > 1:
                other = (m + 1) % n
                if leaves[other] != leaves[m]:
                    assert not verify_inclusion(leaves[m], other, n, proof, r)
            assert not verify_inclusion(leaves[m], m + n, n, proof, r)


@pytest.mark.parametrize("seed", [3, 4])
def test_every_consistency_proof_up_to_40_verifies_and_tampering_fails(seed: int) -> None:
    rng = random.Random(seed)
    data = [rng.randbytes(rng.randrange(1, 40)) for _ in range(40)]
    tree = MerkleTree([leaf_hash(x) for x in data])
    roots = [tree.root(n) for n in range(41)]
    for n in range(1, 41):
        for m in range(0, n + 1):
            proof = tree.consistency_proof(m, n)
            if 0 < m < n:
                assert proof == ref_subproof(m, data[:n], True)
            assert verify_consistency(m, n, roots[m], roots[n], proof)
            if m == 0 or m == n:
                assert proof == []
                continue
            assert not verify_consistency(m, n, _flip(roots[m], rng.randrange(256)), roots[n], proof)
            assert not verify_consistency(m, n, roots[m], _flip(roots[n], rng.randrange(256)), proof)
            for i in range(len(proof)):
                bad = list(proof)
                bad[i] = _flip(bad[i], rng.randrange(256))
                assert not verify_consistency(m, n, roots[m], roots[n], bad)
            assert not verify_consistency(m, n, roots[m], roots[n], proof[:-1])
            assert not verify_consistency(m, n, roots[m], roots[n], [])
            if n < 40:  # the same proof does not prove consistency with a different tree
                assert not verify_consistency(m, n + 1, roots[m], roots[n + 1], proof)


def test_consistency_rejects_a_tree_that_is_not_an_extension() -> None:
    a = [leaf_hash(bytes([i])) for i in range(7)]
    b = a[:3] + [leaf_hash(b"forged")] + a[4:]
    ta, tb = MerkleTree(a), MerkleTree(b)
    assert not verify_consistency(4, 7, ta.root(4), tb.root(7), tb.consistency_proof(4, 7))
    assert not verify_consistency(4, 7, ta.root(4), tb.root(7), ta.consistency_proof(4, 7))


def test_frontier_matches_the_tree_at_every_size() -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(70)]
    f = Frontier()
    assert f.root() == EMPTY_ROOT
    for n, leaf in enumerate(leaves, start=1):
        f.append(leaf)
        assert f.size == n
        assert len(f.hashes) == bin(n).count("1")
        assert f.root() == ref_mth([i.to_bytes(4, "big") for i in range(n)])
    copy = f.copy()
    copy.append(leaves[0])
    assert f.size == 70 and copy.size == 71
    with pytest.raises(ValueError):
        Frontier(3, [leaves[0]])


def test_out_of_range_requests_are_refused() -> None:
    tree = MerkleTree([leaf_hash(b"x")] * 3)
    with pytest.raises(ValueError):
        tree.inclusion_proof(3, 3)
    with pytest.raises(ValueError):
        tree.root(4)
    with pytest.raises(ValueError):
        tree.consistency_proof(3, 2)
    assert not verify_inclusion(leaf_hash(b"x"), 0, 0, [], EMPTY_ROOT)
    assert not verify_consistency(3, 2, EMPTY_ROOT, EMPTY_ROOT, [])

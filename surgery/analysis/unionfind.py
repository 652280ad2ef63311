"""Union-find over 0, 1, 2, ...: the one implementation behind width groups, index spaces and fold
components."""

from __future__ import annotations


class DisjointSets:
    """Disjoint sets of the indices handed out by `add` (path halving). A union keeps the smaller
    root, so the first member made names its set whatever the order of unions."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> tuple[int, int | None]:
        """Join the sets of `a` and `b`: (the kept root, the root it absorbed, None if they were one
        set already)."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a, None
        keep, gone = min(a, b), max(a, b)
        self.parent[gone] = keep
        return keep, gone

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.parent))})

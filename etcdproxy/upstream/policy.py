"""Pick policies: which healthy etcd endpoint a new call goes to.

Pure logic. ``choose(pool)`` gets the healthy members, a non-empty list in
--endpoints order, and returns one of them; members are any hashable objects.
``set_weights({member: weight})`` tells the members after a reload.

- sticky: one member, picked at random, serves every call until it leaves the
  pool; then another is picked at random among the healthy ones. Different proxy
  instances thus spread over the members, and one proxy does not move back when
  a member returns.
- round-robin: each call goes to the next healthy member in turn.
- weighted: smooth weighted round-robin (as nginx does it): in every run of
  sum-of-weights calls, each member gets exactly its weight's share, interleaved
  rather than in bursts.
"""

import random


class StickyRandom:
    name = "sticky"

    def __init__(self, rng=None):
        self._rng = rng or random.Random()
        self.current = None

    def set_weights(self, weights):
        pass

    def choose(self, pool):
        if self.current not in pool:
            self.current = self._rng.choice(pool)
        return self.current


class RoundRobin:
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def set_weights(self, weights):
        pass

    def choose(self, pool):
        member = pool[self._next % len(pool)]
        self._next = (self._next + 1) % len(pool)
        return member


class WeightedRoundRobin:
    name = "weighted"

    def __init__(self, weights):
        """``weights``: {member: positive int}."""
        self.set_weights(weights)

    def set_weights(self, weights):
        self._weights = dict(weights)
        self._current = dict.fromkeys(self._weights, 0)

    def choose(self, pool):
        total = 0
        best = None
        for member in pool:
            weight = self._weights[member]
            total += weight
            self._current[member] += weight
            if best is None or self._current[member] > self._current[best]:
                best = member
        self._current[best] -= total
        return best


POLICIES = ("sticky", "round-robin", "weighted")


def make_policy(name, weights, rng=None):
    """A policy by its --endpoint-policy name; ``weights`` is {member: weight}."""
    if name == "sticky":
        return StickyRandom(rng)
    if name == "round-robin":
        return RoundRobin()
    if name == "weighted":
        return WeightedRoundRobin(weights)
    raise ValueError(f"unknown endpoint policy {name!r} (one of {', '.join(POLICIES)})")

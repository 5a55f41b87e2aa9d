"""torch's `betas=(β1, β2)` spelling beside mango's `beta1` / `beta2`.

Schedulers that cycle momentum (`OneCycleLR`, `CyclicLR` with `cycle_momentum=True`) look for
`betas` in the optimizer's defaults and then write `group["betas"] = (β1_t, β2)` every step,
so every mango param group carries both spellings, kept equal:

* in a group dict given to the constructor or `add_param_group`, either spelling sets the
  other; giving both with different values is a ValueError;
* at each `step()` and `state_dict()`, whichever spelling changed since the last sync wins
  (the scheduler's `betas`, or a user's `beta1`); both changed to different values is a
  ValueError naming the group, and nothing is modified.
"""

from __future__ import annotations

from . import config


def merge_group(defaults: dict, group: dict) -> dict:
    """defaults + group's settings, with `betas` and `beta1`/`beta2` made to agree."""
    merged = {**defaults, **{k: v for k, v in group.items() if k != "params"}}
    if "betas" in group:
        b1, b2 = as_pair(group["betas"])
        if ("beta1" in group or "beta2" in group) and (merged["beta1"], merged["beta2"]) != (b1, b2):
            raise config._err(
                "betas", group["betas"],
                f"disagrees with beta1={merged['beta1']!r}, beta2={merged['beta2']!r} in the same group; set one spelling",
            )  # fmt: skip
        merged["beta1"], merged["beta2"] = b1, b2
    merged["betas"] = (merged["beta1"], merged["beta2"])
    return merged


def as_pair(betas) -> tuple:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise config._err("betas", betas, "must be a pair (beta1, beta2)")
    return tuple(betas)


class BetasSync:
    """Remembers each group's betas as last synced, to tell which spelling a caller changed."""

    def __init__(self):
        self._seen: dict = {}  # id(group) -> (group, betas, (beta1, beta2)); the group ref pins the id

    def record(self, groups) -> None:
        self._seen = {id(g): (g, tuple(g["betas"]), (g["beta1"], g["beta2"])) for g in groups}

    def sync(self, groups) -> None:
        """Make `betas` and `beta1`/`beta2` agree in every group (see the module docstring)."""
        updates = []
        for i, g in enumerate(groups):
            single = (g["beta1"], g["beta2"])
            pair = as_pair(g["betas"]) if "betas" in g else None
            if pair == single:
                continue
            seen = self._seen.get(id(g))
            if seen is not None and seen[0] is not g:
                seen = None
            pair_changed = pair is not None and (seen is None or pair != seen[1])
            single_changed = pair is None or seen is None or single != seen[2]
            if pair_changed and single_changed:
                raise ValueError(
                    f"mango: param_groups[{i}]: betas={pair!r} and beta1/beta2={single!r} were both changed "
                    "and disagree; change one spelling (mango keeps the other equal)"
                )
            b1, b2 = pair if pair_changed else single
            try:
                config.validate_group(dict(g, beta1=b1, beta2=b2, betas=(b1, b2)))
            except ValueError as e:
                raise ValueError(f"mango: param_groups[{i}]: {e}") from None
            updates.append((g, b1, b2))
        for g, b1, b2 in updates:
            g.update(beta1=b1, beta2=b2, betas=(b1, b2))
        self.record(groups)

"""Backend that runs `mango.reference.update` tensor by tensor: the oracle, selectable for checks."""

from __future__ import annotations

from .. import reference


class ReferenceBackend:
    name = "reference"

    def step(self, opt, plan, grads_by_bucket) -> None:
        for bucket, grads in zip(plan.buckets, grads_by_bucket):
            group = opt.param_groups[bucket.group_index]
            for slot, grad in zip(bucket.slots, grads):
                settings = dict(group, role=slot.role, norm=slot.norm)
                reference.update(slot.param, grad, slot.state, settings)

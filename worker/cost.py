"""Cost: the tags a message carries, what a job's tasks took, and a price for it.

- **Tags.** A message's ``job.tags`` (``{"team": "vision"}``) may use only the keys
  the operator allows (``cost.allowed_tags``); they go into the job's metadata as
  ``fanout-tag-<key>`` (and so count in its request digest, as every job option does),
  into its completion event, and label the cost metrics.
- **Usage.** When a job is terminal, the monitor asks the backend for its
  slot-seconds: over its completed tasks, each one's last attempt
  (``executionInfo.endTime - startTime``) times its ``requiredSlots``. Node-seconds
  are slot-seconds over the pool's ``taskSlotsPerNode``: the share of nodes' time the
  tasks held (a node with 4 slots running one 1-slot task for an hour is a quarter
  used by it).
- **Price.** ``estimated_cost = node_seconds / 3600 * cost.prices[<pool vmSize>]``
  (a price per node-hour); no price for the VM size, no cost.
- **Budget.** ``limits.max_task_hours`` bounds a handler's estimate of a job
  (``JobSpec.estimated_task_hours``: each task's expected duration times its
  required slots, summed) before anything is submitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handlers.base import JobSpec
from handlers.errors import BudgetExceeded, InvalidEnvelope
from worker.backends.base import META_TAG_PREFIX, JobUsage
from worker.config import CostConfig, LimitsConfig


def tag_metadata(tags: Mapping[str, str] | None, allowed: Sequence[str]) -> dict[str, str]:
    """The job metadata of a message's cost tags (``fanout-tag-<key>``);
    ``InvalidEnvelope`` naming the key and the allowed ones for a key the operator
    does not allow. Keys and values are checked for their form when the envelope is
    parsed (worker/envelope.py)."""
    if not tags:
        return {}
    unknown = sorted(set(tags) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise InvalidEnvelope(
            f"job.tags: {', '.join(repr(k) for k in unknown)} "
            f"{'is not a tag key' if len(unknown) == 1 else 'are not tag keys'} this worker "
            f"allows (cost.allowed_tags: {known})")
    return {META_TAG_PREFIX + key: value for key, value in sorted(tags.items())}


def tags_of(metadata: Mapping[str, str], keys: Sequence[str] | None = None) -> dict[str, str]:
    """A job's cost tags from its metadata (only ``keys`` when given)."""
    found = {name[len(META_TAG_PREFIX):]: value for name, value in metadata.items()
             if name.startswith(META_TAG_PREFIX)}
    if keys is not None:
        found = {k: v for k, v in found.items() if k in keys}
    return found


def check_budget(job: JobSpec, limits: LimitsConfig) -> None:
    """``BudgetExceeded``, with the arithmetic, when the handler's estimate of the job
    is over ``limits.max_task_hours``. No budget, or no estimate: nothing to check."""
    budget = limits.max_task_hours
    estimate = job.estimated_task_hours
    if budget is None or estimate is None or estimate <= budget:
        return
    basis = f" ({job.estimate_basis})" if job.estimate_basis else ""
    raise BudgetExceeded(
        f"the job is estimated at {_hours(estimate)} task-hours{basis}, over this "
        f"worker's budget of {_hours(budget)} task-hours per message (limits.max_task_hours)")


def _hours(value: float) -> str:
    return f"{value:.4g}" if value < 1000 else f"{value:,.0f}"


@dataclass(frozen=True, slots=True)
class JobCost:
    """A job's usage and estimated cost, as its completion event reports them."""

    slot_seconds: float
    tasks: int
    vm_size: str | None
    slots_per_node: int | None
    node_seconds: float | None
    price_per_node_hour: float | None
    estimated_cost: float | None
    currency: str

    def json(self) -> dict[str, Any]:
        """The event's ``usage`` object."""
        return {
            "slot_seconds": round(self.slot_seconds, 3),
            "node_seconds": (round(self.node_seconds, 3)
                             if self.node_seconds is not None else None),
            "tasks_measured": self.tasks,
            "vm_size": self.vm_size,
            "task_slots_per_node": self.slots_per_node,
            "price_per_node_hour": self.price_per_node_hour,
            "estimated_cost": (round(self.estimated_cost, 6)
                               if self.estimated_cost is not None else None),
            "currency": self.currency,
        }


def price(usage: JobUsage, config: CostConfig) -> JobCost:
    """Node-seconds (slot-seconds over the pool's slots per node) and their cost at
    the configured price per node-hour of the pool's VM size."""
    node_seconds = (usage.slot_seconds / usage.slots_per_node
                    if usage.slots_per_node else None)
    rate = config.prices.get(usage.vm_size.lower()) if usage.vm_size else None
    cost = node_seconds / 3600 * rate if node_seconds is not None and rate is not None \
        else None
    return JobCost(slot_seconds=usage.slot_seconds, tasks=usage.tasks, vm_size=usage.vm_size,
                   slots_per_node=usage.slots_per_node, node_seconds=node_seconds,
                   price_per_node_hour=rate, estimated_cost=cost, currency=config.currency)

"""A re-plan rolled out in two steps, so the current placement serves while joiners fetch layers.

Parts: `Rollout`, one per engine:
- `start(engine, plan) -> bool`: when the plan gives new layers to workers that may have to fetch
  them (`Register.fetches_layers`: `potluck join` workers, which may lack the model folder), it
  sends each an `AssignLayers(prefetch=True)` and holds the plan: nothing is reassigned and the
  current plan keeps serving. False (apply now) when no such worker's range changes, or the
  scheduler has no layer source.
- `cancel()`: forget a held plan (every re-plan starts with it).
- `on_prefetched(engine, message)`: a prefetch answer (`LayersReady(prefetched=True)`); when the
  last of the plan's fetchers has its layers in its cache, the plan is applied (`Engine.apply_plan`:
  the loads read the cache, seconds instead of the transfer). A fetch that failed leaves that
  worker out (drained, reason in `/cluster`) and plans again without it.
A later re-plan (a join, a loss) replaces a held plan; answers for an older one are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from scheduler.cluster import LayerPlan
from scheduler.planner import assignment
from workers import protocol as p

log = logging.getLogger("potluck.scheduler")


class Rollout:
    def __init__(self) -> None:
        self.plan: LayerPlan | None = None  # held until `waiting` is empty
        self.waiting: set[str] = set()

    def cancel(self) -> None:
        self.plan, self.waiting = None, set()

    def start(self, engine: Any, plan: LayerPlan) -> bool:
        self.cancel()
        address, key = engine.layer_source
        if not address:
            return False
        fetchers = [w for w in engine.cluster.workers.values() if w.fetches_layers and not w.draining
                    and (r := plan.ranges.get(w.worker_id)) is not None and (r != w.assigned or w.error is not None)]
        if not fetchers:
            return False
        self.plan, self.waiting = plan, {w.worker_id for w in fetchers}
        config = engine.config
        for worker in fetchers:
            message = assignment(config.model_dir, config.dtype, config.model, worker, plan.ranges[worker.worker_id],
                                 plan, engine.planner_config, config.prefix_caching)
            engine._send(worker.worker_id, replace(message, quantization=config.quantization, layers_address=address,
                                                   layers_key=key, prefetch=True))
        log.info("plan %d held while %s fetch their layers", plan.epoch, ", ".join(sorted(self.waiting)))
        return True

    def on_prefetched(self, engine: Any, message: p.LayersReady) -> None:
        if self.plan is None or message.epoch != self.plan.epoch or message.worker_id not in self.waiting:
            return  # an answer for a plan that was replaced
        if message.error:
            worker = engine.cluster.workers.get(message.worker_id)
            log.error("%s cannot fetch layers [%d, %d): %s; planning without it", message.worker_id,
                      message.start_layer, message.end_layer, message.error)
            self.cancel()
            if worker is not None:
                worker.error, worker.draining = message.error, True  # out of the plan until it registers again
            engine.replan()
            return
        self.waiting.discard(message.worker_id)
        if not self.waiting:
            plan, self.plan = self.plan, None
            engine.apply_plan(plan)

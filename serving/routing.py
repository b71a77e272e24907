"""Request router for engine deployments: only replicas the controller marked routable get new requests.

Soft scale-in and ready-ratio gating act per replica on both hops (ingress -> decode, decode -> prefill): each
engine replica learns from its report to the controller whether it is routable and returns that from
`record_routing_stats()`; Serve polls it every `request_routing_stats_period_s` and hands it to this router in
the caller's process as `RunningReplica.routing_stats`. Among routable replicas: power of two choices on queue
length (Serve's default rule). A replica that has not been polled yet counts as `default_routable` (False when a
controller decides, so a gated replica never slips in before its first poll). If no candidate is routable (a DG
being emptied, or a freshly started DG before the first poll), every candidate is used and a warning is logged:
a request must go somewhere, and the ingress sends none to a DG without routable decode replicas.
"""

from __future__ import annotations

import logging
import random
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)


def routable(stats: dict | None, default: bool) -> bool:
    if not stats or "routable" not in stats:
        return default
    return bool(stats["routable"])


class AdmittedReplicaRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, default_routable: bool = True, **kwargs):
        self._default_routable = default_routable
        self._warned = False

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        admitted = [r for r in candidate_replicas if routable(r.routing_stats, self._default_routable)]
        if not admitted and candidate_replicas:
            if not self._warned:
                logger.warning("no routable replica among %d candidates; using all of them", len(candidate_replicas))
                self._warned = True
            admitted = list(candidate_replicas)
        else:
            self._warned = False
        if len(admitted) <= 2:
            return [random.sample(admitted, len(admitted))] if admitted else []
        return [random.sample(admitted, 2)]

"""The report loop engine replicas and the ingress share: push a payload to the service's controller every
interval and hand its answer back. While the controller cannot be reached (starting, restarting, gone) the
caller keeps its last answer and goes on serving; the loop looks the actor up again on the next round."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from common.vocab import CONTROLLER_NAMESPACE

logger = logging.getLogger(__name__)


async def report_forever(controller_name: str, method: str, interval_s: float, payload: Callable[[], dict],
                         on_answer: Callable[[dict], Any]) -> None:
    import ray

    controller = None
    while True:
        try:
            if controller is None:
                controller = await asyncio.to_thread(ray.get_actor, controller_name, CONTROLLER_NAMESPACE)
            answer = await asyncio.wait_for(getattr(controller, method).remote(payload()),
                                            timeout=max(5.0, 5 * interval_s))
            on_answer(answer)
        except Exception as exc:  # never let reporting touch serving
            controller = None
            logger.debug("report %s to %s failed: %s", method, controller_name, exc)
        await asyncio.sleep(interval_s)

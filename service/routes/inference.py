"""POST /models/{name}: the Inference API URL shape. The model's task (service/tasks/) parses the
body, runs it through the model's batcher and formats the response; this route only checks the API
key, leases the model (service/routes/deps.py) and hands over.

It is a plain Starlette route, not a FastAPI one: it is the route every inference request takes,
and FastAPI's dependency solving and request wrapping cost it more per request than the rest of our
stack does (docs/performance.md, Serving, item 8). What FastAPI would have written in the OpenAPI
document for it is `inference_operation()` (service/openapi_doc.py).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..tasks import TASKS, Call
from .deps import require_api_key, serving


class Inference:
    """POST /models/{name} as an ASGI app. The model stays leased until the response has been sent
    (streams included); errors propagate to the app's error handlers (service/errors.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        state = request.app.state
        await require_api_key(request, state.settings)
        async with serving(scope["path_params"]["name"], request) as entry:
            call = Call(entry.name, entry.runner, entry.worker, state.settings, state.metrics)
            response = await TASKS[entry.task].handle(request, call)
            await response(scope, receive, send)


route = Route("/models/{name}", Inference(), methods=["POST"], name="infer")

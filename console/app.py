"""The page's HTTP side (aiohttp): the page at `/`, its assets (plotly.js from the
installed plotly package), the state as JSON at `/api/state`, and the changes as
server-sent events at `/api/events`: first the whole state (event `state`), then each
change (events `signal`, `alert`, `rollout`, `traffic`, `silences`). A page that cannot
keep up is cut off; its EventSource reconnects and starts again from a fresh state.

`POST /api/actions/<action>` (pause, resume, promote, rollback, undo) with a JSON body
{"model": ..., "reason": ...} passes an operator's action on to the rollout controller
(peers.Actions). Against cross-site requests: only `application/json` bodies (a form
cannot send one, and a script of another origin cannot without a preflight this server
never answers), and a request whose Origin is not the page's own, or that the browser
marks as cross-site, is refused; where keys are on, the admin key is required too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from importlib import resources

from aiohttp import web

from .peers import ActionError, Actions

ASSETS = resources.files("console") / "assets"
PLOTLY_JS = resources.files("plotly") / "package_data" / "plotly.min.js"
FILES = {"page.js": (ASSETS / "page.js", "text/javascript"), "page.css": (ASSETS / "page.css", "text/css"),
         "plotly.min.js": (PLOTLY_JS, "text/javascript")}
# Plotly sets style attributes; nothing else runs but these files.
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                               "img-src 'self' data:; object-src 'none'; base-uri 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
KEEPALIVE_S = 15.0


def dumps(data) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


class Hub:
    """The changes, fanned out to every open stream; each stream holds at most `cap`."""

    def __init__(self, cap: int = 1000):
        self.cap = cap
        self.queues: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=self.cap + 1)
        self.queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.queues.discard(q)

    def publish(self, change: dict) -> None:
        for q in list(self.queues):
            if q.qsize() >= self.cap:
                q.put_nowait(None)  # the one place left: the stream ends there
                self.queues.discard(q)
            else:
                q.put_nowait(change)

    def close(self) -> None:
        """Ends every stream."""
        for q in self.queues:
            q.put_nowait(None)
        self.queues.clear()


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")


def make_app(state: Callable[[], dict], hub: Hub, actions: Actions | None = None) -> web.Application:
    actions = actions or Actions("")
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=(ASSETS / "index.html").read_bytes(), content_type="text/html",
                            charset="utf-8", headers=SECURITY_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound(text=f"no asset {name}")
        path, content_type = FILES[name]
        return web.Response(body=path.read_bytes(), content_type=content_type, charset="utf-8",
                            headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    async def no_icon(request: web.Request) -> web.Response:  # none, and no error in the browser's log
        return web.Response(status=204)

    async def api_state(request: web.Request) -> web.Response:
        return web.Response(text=dumps(state()), content_type="application/json", headers=SECURITY_HEADERS)

    async def api_events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **SECURITY_HEADERS})
        await response.prepare(request)
        first, q = state(), hub.subscribe()  # nothing in between: no change is missed or sent twice
        try:
            await send(response, "state", first)
            while True:
                try:
                    change = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if change is None:
                    break
                await send(response, change["type"], change)
        except ConnectionResetError:
            pass
        finally:
            hub.unsubscribe(q)
        return response

    async def api_action(request: web.Request) -> web.Response:
        def refuse(status: int, error: str, field: str = "") -> web.Response:
            return web.Response(text=dumps({"error": error, "field": field}), status=status,
                                content_type="application/json", headers=SECURITY_HEADERS)

        if not same_origin(request):
            return refuse(403, "cross-site request refused: actions are taken from the page itself", "origin")
        if request.content_type != "application/json":
            return refuse(415, "the body must be JSON (Content-Type: application/json)", "content-type")
        try:
            who = actions.check_key(request.headers.get("Authorization"))
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                raise ActionError(400, "the body is not JSON", "body") from None
            if not isinstance(body, dict):
                raise ActionError(400, "the body must be a JSON object", "body")
            done = await actions.call(request.match_info["action"], body, request.headers.get("Authorization"), who)
        except ActionError as e:
            return refuse(e.status, str(e), e.field)
        return web.Response(text=dumps(done), content_type="application/json", headers=SECURITY_HEADERS)

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/", page)
    app.router.add_get("/assets/{name}", asset)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/api/events", api_events)
    app.router.add_post("/api/actions/{action}", api_action)
    app.router.add_get("/favicon.ico", no_icon)
    return app


async def send(response: web.StreamResponse, event: str, data: dict) -> None:
    await response.write(f"event: {event}\ndata: {dumps(data)}\n\n".encode())

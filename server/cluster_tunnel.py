"""The sockets of ``streamgen serve --replicas N``: placement and the per-WebSocket tunnel.

- :func:`choose`: the replica for a new session (most free real-time capacity, see below).
- :class:`Tunnel`: one client WebSocket pinned to one replica's channel (:class:`Leg`) for
  its life: client messages go over in order (``push``), the replica's output comes back over
  a Ray streaming generator (``events``). A ``busy`` answer to ``start`` is replayed on the
  next replica with room before the client sees it; a replica that dies ends the socket's
  session with ``end`` reason ``replica_lost`` and close 1012.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cluster_ingress import Ingress

CLOSE_REPLICA_LOST = 1012            # RFC 6455 "service restart": the client may reconnect at once
log = logging.getLogger("streamgen.cluster")

def authorized(token: str | None, headers, query) -> bool:
    """The single server's bearer-token rule (header ``Authorization: Bearer T`` or ``?token=T``)."""
    if token is None:
        return True
    given = query.get("token")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                     token.encode("utf-8", "surrogatepass"))


def choose(loads: list, unconfirmed: list[int], tunnels: list[int], exclude=(), need_free: bool = True):
    """Index of the replica for a new session, or None.

    ``loads[i]``: the replica's :meth:`~.cluster_replica.ModelReplica.load` (None: unreachable);
    only ``status == "ok"`` replicas qualify. The score is its free real-time capacity minus the
    sockets this ingress just placed there that have no session yet (``unconfirmed``); highest
    score wins, then fewer sockets, then the lower index. ``need_free=False`` also returns a
    full replica (the best of them) — used at connect time, where the replica's own admission
    answers the ``start``."""
    best = None
    for i, ld in enumerate(loads):
        if i in exclude or not ld or ld.get("status") != "ok":
            continue
        score = int(ld.get("free", 0)) - int(unconfirmed[i])
        if need_free and score <= 0:
            continue
        key = (-score, tunnels[i], i)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


# ---------------------------------------------------------------------------- replicas and sockets
class Replica:
    """The ingress's view of one model replica actor."""

    def __init__(self, index: int, actor):
        self.index, self.actor = index, actor
        self.load: dict | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.lost_sessions = 0
        self.error: str | None = None
        self.tunnels: set = set()
        self.opening = 0                 # channels being opened right now

    def unconfirmed(self, now: float, grace: float) -> int:
        """Sockets that will probably start a session here soon: being opened, a start in flight,
        or placed less than ``grace`` s ago and never streamed."""
        return self.opening + sum(1 for t in self.tunnels if t.session is None and (
            t.start_pending or (not t.had_session and now - t.placed_at < grace)))


class Leg:
    """A tunnel's channel on one replica."""

    def __init__(self, replica: Replica, cid: str, gen):
        self.replica, self.cid, self.gen = replica, cid, gen

    async def push(self, msg: dict) -> bool:
        return await self.replica.actor.push.remote(self.cid, msg)

    def push_nowait(self, msg: dict):
        try:
            self.replica.actor.push.remote(self.cid, msg)
        except Exception:  # pragma: no cover - the actor is gone
            pass


def _is_start(text: str) -> bool:
    if "start" not in text:
        return False
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("type") == "start"


class Tunnel:
    """One client WebSocket and the replica channel it is pinned to."""

    SWITCHED = object()

    def __init__(self, ingress: "Ingress", ws):
        self.ing, self.ws = ingress, ws
        self.leg: Leg | None = None
        self.session: str | None = None
        self.frames = 0
        self.dropped = 0
        self.start_text: str | None = None
        self.start_pending = False
        self.placed_at = time.monotonic()
        self.tried: set[int] = set()
        self.had_session = False
        self.lock = asyncio.Lock()
        self.client_closed = False

    async def send_json(self, obj) -> bool:
        try:
            await self.ws.send_text(json.dumps(obj))
            return True
        except Exception:
            self.client_closed = True
            return False

    async def close(self, code: int, reason: str):
        if self.client_closed:
            return
        self.client_closed = True
        try:
            await self.ws.close(code, reason[:100])
        except Exception:
            pass

    def _attach(self, leg: Leg):
        if self.leg is not None:
            self.leg.replica.tunnels.discard(self)
        self.leg = leg
        self.tried.add(leg.replica.index)
        self.placed_at = time.monotonic()
        leg.replica.tunnels.add(self)

    async def run(self):
        leg = await self.ing.open_leg(self, need_free=False)
        if leg is None:
            self.ing.counters["busy"] += 1
            await self.send_json({"type": "error", "code": "busy", "message": self.ing.no_replica_message()})
            return await self.close(1013, "busy")
        self._attach(leg)
        reader = asyncio.ensure_future(self._reader())
        try:
            await self._writer()
        finally:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass
            if self.leg is not None:
                self.leg.push_nowait({"type": "websocket.disconnect", "code": 1000})
                self.leg.replica.tunnels.discard(self)
            await self.close(1000, "bye")

    async def _reader(self):
        """Client -> replica, in order, one message at a time (the client's TCP waits meanwhile)."""
        while True:
            try:
                msg = await self.ws.receive()
            except Exception:
                msg = {"type": "websocket.disconnect", "code": 1006}
            if msg["type"] == "websocket.disconnect":
                self.client_closed = True
                async with self.lock:
                    if self.leg is not None:
                        self.leg.push_nowait({"type": "websocket.disconnect", "code": msg.get("code", 1000)})
                return
            text = msg.get("text")
            if text is not None and self.session is None and _is_start(text):
                self.start_text, self.start_pending = text, True
            async with self.lock:
                try:
                    await self.leg.push({"type": "websocket.receive", "text": text, "bytes": msg.get("bytes")})
                except Exception:
                    return              # the replica is gone: the writer reports it

    async def _writer(self):
        """Replica -> client, until the replica closes the channel or dies."""
        while True:
            leg = self.leg
            try:
                ref = await leg.gen.__anext__()
                batch = await ref
            except StopAsyncIteration:
                if leg is not self.leg:
                    continue
                return
            except Exception as e:              # RayActorError, ActorUnavailableError, ...
                if leg is not self.leg:
                    continue
                return await self._lost(leg, e)
            for item in batch:
                kind = item[0]
                if kind == "text":
                    if await self._text(leg, item[1]) is self.SWITCHED:
                        break
                elif kind == "bytes":
                    data = item[1]
                    if len(data) > 4 and data[4] in (1, 3):
                        self.frames += 1
                    try:
                        await self.ws.send_bytes(data)
                    except Exception:
                        self.client_closed = True
                        return
                elif kind == "close":
                    return await self.close(item[1], item[2])
                elif kind == "abort":
                    return await self.close(1011, "slow reader")
                else:                        # "end": the handler returned
                    return
            if self.client_closed:
                return

    async def _text(self, leg: Leg, text: str):
        """A JSON message from the replica: track the session, intercept ``busy`` for a replay
        elsewhere, make session ids unique in the cluster (``r<replica>-<id>``), forward."""
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            await self._send_text(text)
            return None
        typ = msg.get("type")
        if isinstance(msg.get("session"), str):
            msg["session"] = f"r{leg.replica.index}-{msg['session']}"
            text = json.dumps(msg)
        if typ == "ready":
            self.session, self.frames, self.dropped, self.start_pending = msg["session"], 0, 0, False
            self.had_session = True
        elif typ == "stats":
            self.dropped = msg.get("dropped_frames", self.dropped)
        elif typ == "end":
            self.session = None
        elif typ == "error" and msg.get("code") == "busy" and self.start_text is not None and self.session is None:
            if await self.ing.replace(self) is not None:
                return self.SWITCHED
            self.start_pending = False
        elif typ == "error" and self.start_pending:
            self.start_pending = False
        await self._send_text(text)
        return None

    async def _send_text(self, text: str) -> bool:
        try:
            await self.ws.send_text(text)
            return True
        except Exception:
            self.client_closed = True
            return False

    async def switch(self, leg: Leg) -> bool:
        """Move this socket (no session yet) to ``leg`` and replay its start there."""
        async with self.lock:
            try:
                ok = await leg.push({"type": "websocket.receive", "text": self.start_text, "bytes": None})
            except Exception:
                ok = False
            if not ok:
                return False
            old = self.leg
            self._attach(leg)
            if old is not None:
                old.push_nowait({"type": "websocket.disconnect", "code": 1000})
        return True

    async def _lost(self, leg: Leg, err: Exception):
        rep = leg.replica
        rep.load = None
        rep.error = f"{type(err).__name__}: {str(err)[:200]}"
        log.warning("replica %d lost (%s); ending its socket", rep.index, type(err).__name__)
        self.ing.counters["replica_lost_sockets"] += 1
        if self.session is not None:
            rep.lost_sessions += 1
            self.ing.counters["replica_lost_sessions"] += 1
            await self.send_json({"type": "end", "session": self.session, "reason": "replica_lost",
                                  "message": "the model replica serving this session stopped; reconnect to start "
                                             "a new session (the service keeps running)",
                                  "frames": self.frames, "dropped_frames": self.dropped})
            self.session = None
        await self.close(CLOSE_REPLICA_LOST, "replica_lost")
        self.leg = None
        rep.tunnels.discard(self)

"""The simulator's API keys and organisations (``[keys.LABEL]`` and ``[groups.NAME]`` of a
profile): which key a request carries, whether it is still valid, the hidden limits of the key and
of its organisation, and the per-key and per-organisation counters of ``/stats``.

A key is known by its LABEL everywhere it is shown (stats, admin routes, 429 messages); its value
is only compared, never written out. A key without ``group`` is its own organisation, named by its
label. A key is revoked (401 on every wire) ``revoke_after_s`` after server start, after
``revoke_after_requests`` requests carrying it, or by ``POST /sim/keys/{label}/revoke``;
``/sim/keys/{label}/restore`` and ``/reset`` give it back. Without ``[keys]`` the ring is
``enabled = False`` and the wires fall back to the profile's single ``api_key`` (if any).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, MutableMapping
from typing import Literal

import orjson
from aiohttp import web

from fairdistill.engine.sim.limits import Quota
from fairdistill.engine.sim.profiles import KeyProfile, SimProfile

KEY_FIELDS = ("requests", "ok", "http_429", "http_401", "cached_tokens", "prompt_tokens")
GROUP_FIELDS = ("requests", "ok", "http_429")
Refused = Literal["missing", "unknown", "revoked"]


class KeyState:
    """One key's live state: its quota, the requests that carried it, whether it is revoked."""

    __slots__ = ("armed", "count", "label", "org", "profile", "quota", "revoked")

    def __init__(self, label: str, profile: KeyProfile):
        self.label = label
        self.profile = profile
        self.org = profile.group if profile.group is not None else label
        self.quota = Quota(f"key {label}", profile.rpm, profile.tpm, profile, profile.limit_headers)
        self.count = 0  # requests that carried it since the last reset
        self.revoked = False  # by the admin route
        self.armed = True  # revoke_after_* apply (a restore disarms them until /reset)

    def reset(self) -> None:
        self.quota.reset()
        self.count = 0
        self.revoked = False
        self.armed = True

    def valid(self, elapsed_s: float) -> bool:
        """Whether the key is still accepted, ``elapsed_s`` after server start."""
        if self.revoked:
            return False
        if not self.armed:
            return True
        p = self.profile
        if p.revoke_after_s is not None and elapsed_s >= p.revoke_after_s:
            return False
        return p.revoke_after_requests is None or self.count <= p.revoke_after_requests


class KeyRing:
    """The keys and organisations of one simulator, with their counters: ``stats`` (the server's),
    ``by_key`` (by label) and ``by_group`` (by organisation), those of ``core.SimStats``."""

    def __init__(
        self,
        profile: SimProfile,
        stats: Counter,
        by_key: MutableMapping[str, Counter],
        by_group: MutableMapping[str, Counter],
        elapsed: Callable[[], float],
    ):
        self.stats = stats
        self.by_key, self.by_group = by_key, by_group
        self.elapsed = elapsed  # seconds since server start (revoke_after_s counts from there)
        self.keys = {label: KeyState(label, kp) for label, kp in profile.keys.items()}
        self.by_value = {k.profile.value: k for k in self.keys.values()}
        self.groups: dict[str, Quota] = {}
        for k in self.keys.values():
            gp = profile.groups.get(k.org)
            if gp is not None and k.org not in self.groups:
                self.groups[k.org] = Quota(f"organization {k.org}", gp.rpm, gp.tpm, gp, gp.limit_headers)
        self.enabled = bool(self.keys)
        self.zero()

    def zero(self) -> None:
        """Every key and organisation in the counters, at 0 (a stable ``/stats`` shape)."""
        for k in self.keys.values():
            self.by_key[k.label] = Counter(dict.fromkeys(KEY_FIELDS, 0))
            self.by_group[k.org] = Counter(dict.fromkeys(GROUP_FIELDS, 0))

    def reset(self) -> None:
        """``/reset``: every key restored, every quota full, counters at 0."""
        for k in self.keys.values():
            k.reset()
        for q in self.groups.values():
            q.reset()
        self.zero()

    def authenticate(self, given: str | None) -> KeyState | Refused:
        """The key whose value is ``given``, counted; or why it is refused (a revoked key's 401
        is counted on it)."""
        if not given:
            return "missing"
        key = self.by_value.get(given)
        if key is None:
            self.stats["http_401"] += 1
            return "unknown"
        key.count += 1
        self.tally(key, "requests")
        if not key.valid(self.elapsed()):
            self.stats["http_401"] += 1
            self.tally(key, "http_401")
            return "revoked"
        return key

    def quotas(self, key: KeyState | None) -> list[Quota]:
        """The limits a request of ``key`` must pass before the model's: the key's, its group's."""
        if key is None:
            return []
        out = [key.quota] if key.quota.limited else []
        group = self.groups.get(key.org)
        if group is not None and group.limited:
            out.append(group)
        return out

    def tally(self, key: KeyState | None, field: str, n: int = 1) -> None:
        """Count ``n`` on the key (and on its organisation for the fields it keeps)."""
        if key is None:
            return
        self.by_key[key.label][field] += n
        if field in GROUP_FIELDS:
            self.by_group[key.org][field] += n

    def billed(self, key: KeyState | None, usage: dict) -> None:
        """Count one answered request's prompt and cached tokens on its key."""
        if key is None:
            return
        self.tally(key, "prompt_tokens", usage.get("prompt_tokens", 0))
        self.tally(key, "cached_tokens", usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))

    # -- admin routes -------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/sim/keys", self.listing)
        app.router.add_post("/sim/keys/{label}/{verb}", self.admin)

    def view(self, key: KeyState) -> dict:
        revoked = not key.valid(self.elapsed())
        return {"label": key.label, "group": key.org, "revoked": revoked, "requests": key.count}

    async def listing(self, request: web.Request) -> web.Response:
        """``GET /sim/keys``: each key's label, organisation and state (never its value)."""
        return _json({"keys": [self.view(k) for k in self.keys.values()]})

    async def admin(self, request: web.Request) -> web.Response:
        """``POST /sim/keys/{label}/revoke`` and ``.../restore``: the key's state after it."""
        key = self.keys.get(request.match_info["label"])
        verb = request.match_info["verb"]
        if key is None or verb not in ("revoke", "restore"):
            return _json({"error": f"no key {request.match_info['label']!r} or verb {verb!r}"}, 404)
        key.revoked = verb == "revoke"
        if verb == "restore":
            key.armed = False
        return _json(self.view(key))


def org_of(key: KeyState | None) -> str | None:
    """The organisation of a request's key (None: the simulator has no keys)."""
    return key.org if key is not None else None


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")

"""Access control of the ServiceNow simulator: fault switches, Basic and Bearer authentication, the OAuth
token endpoint, the per-user hourly rate limit and injected failures (a mixin of
:class:`~include.simulators.servicenow_core.Simulator`: it uses the instance's ``lock``, ``config``,
``faults``, token tables and counters)."""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import time

from include.simulators.servicenow_base import SIM_USER, Reply, error
from include.simulators.servicenow_schema import RATE_LIMIT_RULE


class AccessMixin:
    """Faults, authentication, OAuth tokens and rate limits of one simulated instance."""

    # ---------------------------------------------------------------- faults
    def set_faults(self, **kw) -> dict:
        """Apply fault controls (see the module docs of servicenow_sim); returns the active faults."""
        with self.lock:
            for key, value in kw.items():
                if key == "fail_next":
                    items = value if isinstance(value, list) else [value]
                    for item in items:
                        if not isinstance(item, dict) or "status" not in item:
                            raise ValueError("fail_next needs {'status': int, 'count': int, 'path_prefix': str}")
                        item.setdefault("count", 1)
                        item.setdefault("path_prefix", "/")
                    self.faults.fail_next.extend(items)
                elif key == "token_lifetime":
                    self.token_lifetime = int(value)
                elif key == "revoke_tokens":
                    if value:
                        self.access.clear()
                elif key == "revoke_refresh_tokens":
                    if value:
                        self.refresh.clear()
                elif key == "deny_writes":
                    self.faults.deny_writes = ["*"] if value is True else list(value or [])
                elif hasattr(self.faults, key):
                    setattr(self.faults, key, value)
                else:
                    raise ValueError(f"unknown fault {key!r}")
            return self.fault_state()

    def fault_state(self) -> dict:
        out = dict(self.faults.__dict__)
        out["token_lifetime"] = self.token_lifetime
        return out

    # ---------------------------------------------------------------- auth
    def authenticate(self, authorization: str | None) -> str | None:
        """The user behind an Authorization header (Basic or Bearer), or None."""
        if not authorization or self.faults.reject_credentials:
            return None
        scheme, _, cred = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(cred.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return user if user and self.config.users.get(user) == password else None
        if scheme.lower() == "bearer":
            entry = self.access.get(cred.strip())
            if entry and entry[2] > time.time():
                return entry[0]
        return None

    def _issue(self, key: tuple[str, str], with_refresh: bool, scope: str) -> dict:
        now = time.time()
        at, rt = self.current.get(key, (None, None))
        if not at or at not in self.access or self.access[at][2] <= now:
            at = secrets.token_urlsafe(64)
        self.access[at] = (key[1], key[0], now + self.token_lifetime)
        out = {"scope": scope, "token_type": "Bearer", "expires_in": max(self.token_lifetime - 1, 0)}
        if with_refresh:
            if not rt or rt not in self.refresh or self.refresh[rt][2] <= now:
                rt = secrets.token_urlsafe(64)
            self.refresh[rt] = (key[1], key[0], now + self.config.refresh_token_lifetime)
            out["refresh_token"] = rt
        self.current[key] = (at, rt)
        out["access_token"] = at
        return out

    def oauth_token(self, content_type: str, form: dict) -> Reply:
        """POST /oauth_token.do. Every failure is 401 server_error/access_denied, as ServiceNow answers."""
        with self.lock:
            self.count("token_requests")
            denied = Reply(401, {"error_description": "access_denied", "error": "server_error"})
            if not content_type.lower().startswith("application/x-www-form-urlencoded"):
                return denied  # JSON bodies and query-string parameters are not read
            cid, secret, grant = form.get("client_id", ""), form.get("client_secret", ""), form.get("grant_type")
            if self.faults.reject_credentials or not cid or self.config.clients.get(cid) != secret:
                return denied
            if grant == "password":
                user = form.get("username", "")
                if not user or self.config.users.get(user) != form.get("password"):
                    return denied
                return Reply(200, self._issue((cid, user), True, form.get("scope") or "useraccount"))
            if grant == "refresh_token":
                entry = self.refresh.get(form.get("refresh_token", ""))
                if not entry or entry[1] != cid or entry[2] <= time.time():
                    return denied
                rt = form["refresh_token"]
                at, _ = self.current.get((cid, entry[0]), (None, None))
                now = time.time()
                if not at or at not in self.access or self.access[at][2] <= now:
                    at = secrets.token_urlsafe(64)
                self.access[at] = (entry[0], cid, now + self.token_lifetime)
                self.current[(cid, entry[0])] = (at, rt)  # the refresh token is echoed, not rotated or extended
                return Reply(200, {"scope": "useraccount", "token_type": "Bearer",
                                   "expires_in": max(self.token_lifetime - 1, 0), "refresh_token": rt,
                                   "access_token": at})
            if grant == "client_credentials" and self.config.client_credentials_enabled:
                app_user = next(iter(self.config.users), SIM_USER)
                return Reply(200, self._issue((cid, app_user), False, form.get("scope") or ""))
            return denied

    # ----------------------------------------------------------- rate limit
    def rate_check(self, user: str, api: str) -> tuple[Reply | None, dict]:
        limit = self.faults.rate_limit_per_hour
        if not limit:
            return None, {}
        with self.lock:
            now = time.monotonic()
            window = self.windows[user]
            while window and window[0] <= now - 3600:
                window.popleft()
            wait = window[0] + 3600 - now if window else 3600.0  # the oldest counted request leaves the window
            headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Reset": str(int(time.time() + wait)),
                       "X-RateLimit-Rule": RATE_LIMIT_RULE}
            if len(window) >= limit:
                self.count("rate_limited")
                return error(429, "Rate limit exceeded", f"Rate limit of {limit} requests per hour for {api} exceeded",
                             {**headers, "Retry-After": str(max(1, math.ceil(wait)))}), headers
            window.append(now)
            return None, headers

    def take_fault(self, path: str) -> dict | None:
        with self.lock:
            for item in self.faults.fail_next:
                if path.startswith(item["path_prefix"]) and item["count"] > 0:
                    if item.get("after", 0) > 0:   # let this many matching requests through first
                        item["after"] -= 1
                        continue
                    item["count"] -= 1
                    if item["count"] <= 0:
                        self.faults.fail_next.remove(item)
                    self.count("faults_injected")
                    return item
        return None

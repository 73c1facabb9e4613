"""Who is asking, as gatewayd.web's modules share it: roles, the principal of a request, the CSRF form field.
Decided by :mod:`gatewayd.web.auth`; shown by :mod:`gatewayd.web.page`, which imports this and not the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}

CSRF_FIELD = "csrf_token"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: a token's name and role. ``via`` says how it was established (bearer, session,
    anonymous, or open when access control is off)."""

    name: str
    role: Role
    via: Literal["bearer", "session", "anonymous", "open"] = "bearer"

    def can(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def authenticated(self) -> bool:
        return self.via in ("bearer", "session")

    def to_api(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "via": self.via}


ANONYMOUS = Principal("anonymous", "viewer", "anonymous")
OPEN = Principal("anonymous", "admin", "open")  # [http.auth] enabled = false: no access control (loopback only)


ANONYMOUS = Principal("anonymous", "viewer", "anonymous")
OPEN = Principal("anonymous", "admin", "open")  # [http.auth] enabled = false: no access control (loopback only)

"""Where a user's session is: the relay's routing seam.

The relay asks a `Router` before it sends anything to a user (a DELIVER, a
receipt, a presence notice, a typing notice) and before it says whether a
user is online. The answer is one of three, told apart with `match`:

- a `Session`: the user is logged in on this node; send it there;
- a `NodeId` (a `str`): the user is logged in on another node of a
  cluster; what was accepted for them waits in the shared store, and the
  cluster forwards or that node pages it (issue 15's business);
- `None`: the user is not logged in anywhere; what was accepted waits in
  their mailbox for their next login.

`LocalRouter` is the only implementation today: one node, so the answer is
the user's local session or nobody. A cluster router (over Redis) keeps a
route per logged-in user, `user key -> node id`, written by `bind`, removed
by `unbind`, and expiring on its own unless the node renews it: each node
renews the routes of its live sessions on a keepalive well inside the
route's TTL, so a node that dies loses its users' routes within one TTL
and they read as `None` (offline) rather than pointing at a dead node.

The answers are plain objects, not wrappers, so asking costs no allocation
on the relay's per-message path.
"""

from __future__ import annotations

from typing import Protocol

from server_records import Session, User

__all__ = ["LocalRouter", "NodeId", "Route", "Router"]

#: A cluster node's name (e.g. "host:port" of its relay).
NodeId = str
#: Where a user's session is: here, on another node, or nowhere.
Route = Session | NodeId | None


class Router(Protocol):
    """Answers where a user's session is, and is told when that changes.

    Contract for implementations:
    - `locate` is called on the loop thread for every routed message: it
      must answer from memory (a cache the router keeps current), never by
      a network or disk round trip;
    - after `bind(user, session)` returns, `locate(user)` answers that
      session on this node; after `unbind(user, session)`, not that session
      (another node's route, or `None`);
    - `unbind` of a session that is no longer the user's route (a newer
      login took over) changes nothing;
    - routes to other nodes may be stale by up to their TTL: what is sent
      along one must survive the other node being gone (it waits in the
      store, acknowledged only there)."""

    def locate(self, user: User) -> Route:
        """Where `user`'s session is."""
        ...

    def bind(self, user: User, session: Session, now: float) -> None:
        """`session` (on this node) is now `user`'s route."""
        ...

    def unbind(self, user: User, session: Session, now: float) -> None:
        """`session` ended; if it was `user`'s route, `user` has none here."""
        ...


class LocalRouter:
    """One node: a user's route is the session it holds here (`User.session`)."""

    def locate(self, user: User) -> Route:
        return user.session

    def bind(self, user: User, session: Session, now: float) -> None:
        user.session = session

    def unbind(self, user: User, session: Session, now: float) -> None:
        if user.session is session:
            user.session = None

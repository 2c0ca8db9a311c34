"""Which members a policy has and where their files are: the composition of members from models.lock, the
export store and the served precision (the one place that knows the encoder's precision rule)."""

from __future__ import annotations

from pathlib import Path

from calm_cli.errors import CalmError
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store
from calm_cli.members.base import Member
from calm_cli.members.local import LocalMember
from calm_cli.members.remote import RemoteMember
from calm_cli.policy import MemberPolicy, Policy


class EncoderMissing(CalmError):
    """The routing encoder has no export: nothing can be routed."""


def encoder_dir(store: Store, name: str) -> Path:
    """The routing encoder's export: int8 (what `calm models export` makes), else fp32 if that is all there is."""
    exports = store.exports(name)
    for precision in ("int8", "fp32"):
        if precision in exports:
            return exports[precision]
    raise EncoderMissing(f"the routing encoder {name} has no export: run `calm models export {name}`")


def members(policy: Policy, store: Store, precision: str) -> dict[str, Member]:
    """Every member the policy may run (its fleet, then its escalation target), by name: a remote one where
    the policy gives it an endpoint, a local export otherwise."""
    specs = lock.load()
    return {m.model: RemoteMember(m) if m.endpoint else
            LocalMember(m, specs[m.model], precision, store.exports(m.model).get(precision)) for m in policy.members}


def outside(name: str, store: Store, precision: str) -> LocalMember:
    """A models.lock model that no policy names (the benchmark's baseline, a model being profiled), as a local
    member with the policy defaults."""
    return LocalMember(MemberPolicy(name, name), lock.load()[name], precision, store.exports(name).get(precision))

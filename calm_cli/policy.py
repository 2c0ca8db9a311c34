"""Policies: the fleet, QoS goals, score weights, cache, queue and escalation, from a validated YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calm_cli import bounded, schema
from calm_cli.fleet import lock
from calm_cli.resources import POLICIES

DEFAULT = POLICIES / "default.yaml"


@dataclass(frozen=True)
class MemberPolicy:
    """One member's entry in a policy: what it is for (description, examples) and its answer defaults."""

    model: str
    description: str
    examples: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    max_tokens: int = 256
    temperature: float = 0.0
    endpoint: dict | None = field(default=None, compare=False)  # a remote member's server (schemas: endpoint)
    draft: str | None = None  # prompt-lookup, none or a fleet member (schemas: draft); None: CALM_SPECULATE's default
    draft_tokens: int | str | None = None  # a number or "adaptive"; None: CALM_SPECULATE

    @property
    def draft_model(self) -> str | None:
        """The fleet member that drafts for this one, if a model does."""
        return self.draft if self.draft not in (None, "prompt-lookup", "none") else None


@dataclass(frozen=True)
class Policy:
    name: str
    source: str
    fleet: tuple[MemberPolicy, ...]
    goals: dict
    weights: dict
    cache: dict
    queue: dict
    escalation: dict
    energy: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    text: str = field(default="", repr=False, compare=False)  # the file as read, so `policy show` never reads twice

    @property
    def escalation_member(self) -> MemberPolicy | None:
        e = self.escalation
        if not e.get("enabled"):
            return None
        return MemberPolicy(e["model"], e.get("description", "the larger model"), max_tokens=e.get("max_tokens", 256),
                            endpoint=e.get("endpoint"), draft=e.get("draft"), draft_tokens=e.get("draft_tokens"))

    @property
    def verifies(self) -> bool:
        """Escalation checks the first answer and continues from the first disagreement (mode verify)."""
        return self.escalation.get("mode", "verify") == "verify"

    @property
    def members(self) -> tuple[MemberPolicy, ...]:
        """Every model the policy may run: the fleet, then the escalation target."""
        extra = self.escalation_member
        return self.fleet + ((extra,) if extra and extra.model not in {m.model for m in self.fleet} else ())

    @property
    def encoder(self) -> str:
        return self.routing.get("encoder", "minilm-l6")


def _cross_checks(data: dict, source: str, models: dict[str, lock.ModelSpec]) -> list[str]:
    """What the schema cannot say: names must exist in models.lock and play a role they can play."""
    out = []
    fleet_names = [m["model"] for m in data["fleet"]]
    first: dict[str, int] = {}
    for i, name in enumerate(fleet_names):
        if "endpoint" in data["fleet"][i]:
            if name in models:
                out.append(f"{source}: fleet[{i}].model: {name!r} has an endpoint, so it names a remote member: "
                           "use a name that is not in models.lock (the server's own name goes in endpoint.model)")
        elif name not in models:
            out.append(f"{source}: fleet[{i}].model: {name!r} is not in models.lock ({', '.join(models)})")
        elif not models[name].generative:
            out.append(f"{source}: fleet[{i}].model: {name!r} is an encoder, not a model that answers")
        if first.setdefault(name, i) != i:
            out.append(f"{source}: fleet[{i}].model: {name!r} is listed twice")
    esc = data["escalation"]
    if esc.get("enabled") and "endpoint" in esc and esc.get("model") in models:
        out.append(f"{source}: escalation.model: {esc.get('model')!r} has an endpoint: use a name that is not in "
                   "models.lock")
    elif esc.get("enabled") and "endpoint" not in esc and esc.get("model") not in models:
        out.append(f"{source}: escalation.model: {esc.get('model')!r} is not in models.lock")
    local = {m["model"] for m in data["fleet"] if "endpoint" not in m}
    entries = [(f"fleet[{i}]", m) for i, m in enumerate(data["fleet"])]
    entries += [("escalation", esc)] if esc.get("enabled") else []
    for where, entry in entries:
        draft = entry.get("draft")
        if draft in (None, "prompt-lookup", "none"):
            continue
        if "endpoint" in entry:
            out.append(f"{source}: {where}.draft: a remote member decodes on its own server: no draft here")
        elif draft == entry.get("model"):
            out.append(f"{source}: {where}.draft: {draft!r} is the member itself")
        elif draft not in local:
            out.append(f"{source}: {where}.draft: {draft!r} is not prompt-lookup, none or a local fleet member of "
                       f"this policy ({', '.join(sorted(local))})")
        elif entry.get("model") in models and models[draft].architecture != models[entry["model"]].architecture:
            out.append(f"{source}: {where}.draft: {draft!r} ({models[draft].architecture}) is another family "
                       f"than {entry['model']} ({models[entry['model']].architecture}): drafts need the same tokenizer")
    runnable = set(fleet_names) | ({esc.get("model")} if esc.get("enabled") else set())
    for i, name in enumerate(data["cache"].get("pinned", [])):
        if name not in runnable:
            out.append(f"{source}: cache.pinned[{i}]: {name!r} is not a model of this policy")
    encoder = data.get("routing", {}).get("encoder", "minilm-l6")
    if encoder not in models or models[encoder].generative:
        out.append(f"{source}: routing.encoder: {encoder!r} is not an encoder in models.lock")
    return out


def load(path: Path | None = None) -> Policy:
    """The policy at `path` (the embedded default when None). Anything that is not a valid policy (not a
    regular file, over calm_cli.bounded's limits, not YAML, not the schema, unknown models) raises
    schema.InvalidFile with one line per problem; nothing else is raised."""
    path = path or DEFAULT
    text, data = schema.read_yaml(path)
    source = bounded.one_line(str(path), 200)
    problems = schema.problems(data, "policy.schema.json", source)
    if not problems:
        problems = _cross_checks(data, source, lock.load())
    if problems:
        raise schema.InvalidFile(source, problems)
    return Policy(
        name=data["name"],
        source=source,
        fleet=tuple(MemberPolicy(m["model"], m["description"], tuple(m.get("examples", ())), tuple(m.get("domains", ())),
                           m.get("max_tokens", 256), m.get("temperature", 0.0), m.get("endpoint"),
                           m.get("draft"), m.get("draft_tokens"))
                     for m in data["fleet"]),
        goals=data["goals"],
        weights=data["weights"],
        cache=data["cache"],
        queue=data["queue"],
        escalation=data["escalation"],
        energy=data.get("energy", {}),
        routing=data.get("routing", {}),
        text=text,
    )

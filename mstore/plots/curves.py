"""The loss curves of model lineages on one cumulative-step axis (no torch, no matplotlib).

Each generation's steps come after its parent's: a fine-tune of a 40-step fine-tune
starts at step 40. A generation shared by several named lineages is one curve; eval
notes (format-2 attachments) are points at the end of their generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import NothingToPlot
from ..store.repo import Store


@dataclass
class Curve:
    """One trained generation: its losses at cumulative steps."""

    commit: str
    label: str
    start: int  # the cumulative step its training starts after
    steps: int
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    notes: list[tuple[int, float, str]] = field(default_factory=list)  # eval attachments


def lineage_curves(store: Store, names: list[str]) -> list[Curve]:
    """The curves of every named model's lineage, oldest generation first, each once."""
    by_commit = store.names_by_commit()
    curves: dict[str, Curve] = {}
    for name in names:
        commit = store.resolve(name).commit
        lineage = list(store.lineage(commit))[::-1]
        offset = 0
        trained = False
        for oid, m in lineage:
            t = m.training if m is not None else None
            if not t:
                continue
            trained = True
            steps = int(t.get("steps") or _last_step(t))
            if oid not in curves:
                curves[oid] = _curve(store, oid, by_commit.get(oid, []), offset, steps, t)
            offset += steps
        if not trained:
            raise NothingToPlot(name)
    return sorted(curves.values(), key=lambda c: (c.start, c.label))


def _curve(store: Store, oid: str, names: list[str], offset: int, steps: int,
           t: dict[str, Any]) -> Curve:
    label = f"{', '.join(sorted(names)) or '(no ref)'} ({oid[:12]})"
    curve = Curve(oid, label, offset, steps, _points(t.get("train_loss"), offset),
                  _points(t.get("eval_loss"), offset))
    for a in store.attachments.list(oid, "eval"):
        loss = a.payload.get("loss")
        if isinstance(loss, (int, float)):
            curve.notes.append((offset + steps, float(loss),
                                str(a.payload.get("dataset") or "eval")))
    return curve


def _points(history: Any, offset: int) -> list[tuple[int, float]]:
    out = []
    for item in history or []:
        if isinstance(item, list) and len(item) == 2 and all(
                isinstance(v, (int, float)) for v in item):
            out.append((offset + int(item[0]), float(item[1])))
    return out


def _last_step(t: dict[str, Any]) -> int:
    points = _points(t.get("train_loss"), 0)
    return points[-1][0] if points else 0

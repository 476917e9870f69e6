"""Presets of the Segmenter: ``"ours"`` (the defaults) and ``"paper"`` (every value the paper states).

``Segmenter(preset="paper")`` is the paper's configuration as far as it is published (method.md, "What the
full paper reports"): mode mv, the Stable Diffusion 2 affinity, the whole image (no sliding windows), and the
head of :meth:`~ovss_fast.ops.options.HeadOptions.paper` (readout velocity, transition attention, tau 0.3,
eps 0.1, iters 50, sk_iters 15, NMS on by our reading of its rule). What the paper does not state stays ours
(:func:`preset_record` lists which is which). A value given explicitly overrides the preset's and is
recorded as overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ovss_fast.ops import validate as check
from ovss_fast.ops.options import PRESETS, HeadOptions, preset_head

#: the Segmenter settings of each preset besides the head options (window None: the whole image)
SETTINGS: dict[str, dict[str, Any]] = {
    "ours": {"mode": "mv", "affinity": "clip", "window": None},
    "paper": {"mode": "mv", "affinity": "sd2", "window": None},
}
#: what the paper states among the Segmenter settings (the rest of a preset is ours)
PAPER_STATES = ("mode", "affinity", "window")


@dataclass(frozen=True)
class ResolvedPreset:
    """A preset with the explicit arguments applied: the Segmenter's mode, affinity, window and head options,
    and the record for a results file."""

    name: str
    mode: str
    affinity: Any
    window: Any
    options: HeadOptions
    overridden: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return preset_record(self.name, self.overridden)


def resolve_preset(preset: str, *, mode: str | None, affinity: Any, window: Any,
                   options: dict[str, Any]) -> ResolvedPreset:
    """The preset's values, each replaced by the argument given (not None, or present in ``options``)."""
    check.choice("preset", preset, PRESETS)
    settings = SETTINGS[preset]
    head = preset_head(preset)
    given = {"mode": mode, "affinity": affinity, "window": window}
    overridden = {k: v for k, v in given.items() if v is not None and v != settings[k]}
    overridden.update({k: v for k, v in options.items() if k in head and v != head[k]})
    return ResolvedPreset(
        preset,
        mode if mode is not None else settings["mode"],
        affinity if affinity is not None else settings["affinity"],
        window,  # None (the whole image) in both presets
        HeadOptions.of("Segmenter", {**head, **options}),
        {k: v if isinstance(v, (str, int, float, bool, tuple, list)) or v is None else getattr(v, "__name__", repr(v))
         for k, v in overridden.items()},
    )


def preset_record(preset: str, overridden: dict[str, Any] | None = None) -> dict[str, Any]:
    """For a results file: the preset, the values it takes from the paper, the ones it fills with ours, and
    the ones given explicitly over it."""
    check.choice("preset", preset, PRESETS)
    head = preset_head("paper")
    defaults = HeadOptions().as_dict()
    if preset == "paper":
        paper = {**{k: SETTINGS["paper"][k] for k in PAPER_STATES}, **head}
        ours = {k: v for k, v in defaults.items() if k not in head}
    else:
        paper = {k: v for k, v in {**SETTINGS["ours"], **defaults}.items()
                 if k in PAPER_STATES + tuple(head) and v == {**SETTINGS["paper"], **head}.get(k)}
        ours = {k: v for k, v in {**SETTINGS["ours"], **defaults}.items() if k not in paper}
    # the paper says NMS is on but not its rule or ratio: these paper values are our reading
    read = [k for k in ("nms", "nms_axis") if k in paper]
    return {"name": preset, "paper_values": paper, "paper_values_by_our_reading": read, "our_values": ours,
            "overridden": dict(overridden or {})}


__all__ = ["PAPER_STATES", "PRESETS", "SETTINGS", "ResolvedPreset", "preset_record", "resolve_preset"]

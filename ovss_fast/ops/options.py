"""The DSLO head's options, declared once: :class:`HeadOptions`.

Every knob of the head (class distributions, discrepancy, joint bilateral upsampling) is one
field below, with its default, the op that takes it, its check, its command-line help and (for
string options) its choices. Everything else reads the fields instead of repeating the list:

- :func:`ovss_fast.segment_features` and :class:`ovss_fast.DSLOHead` take them as ``**options``;
- :class:`ovss_fast.Segmenter` takes them as keywords and holds ``self.options``;
- ``ovss-fast segment`` / ``eval`` build one flag per field (``--sk-iters`` for ``sk_iters``,
  :func:`ovss_fast.apps.flags.add_method_arguments`) and check it with the field's check;
- the eval results file records :meth:`HeadOptions.as_dict`.

Adding an option is one line here: ``name: type = option(default, "op", check, "help")``, where
"op" is the keyword's op (``class_distributions``, ``discrepancy``, ``jbu`` or ``refine``) and check is
``check(name, value) -> value`` raising a message that names ``name`` (for a choice,
``one_of(CHOICES)`` and ``choices=CHOICES``). See ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ovss_fast.errors import InputTypeError
from ovss_fast.kernels.common import EPS, ITERS, RADIUS, SIGMA_RANGE, SIGMA_SPATIAL, SK_ITERS, STEPS, TAU
from ovss_fast.ops import validate as check

#: the ops a head option can belong to (``jbu``: both jbu_upsample and jbu_argmax; ``refine``: the step from
#: the scores to the output size, ``refine`` itself and PAMR's ``pamr_iters`` / ``pamr_dilations``, which
#: :meth:`HeadOptions.pamr_params` hands to :func:`ovss_fast.pamr` as its ``iters`` / ``dilations``;
#: ``label_propagation``: head "lposs"'s patch stage, ``lposs_k`` ... ``lposs_tol``, which
#: :meth:`HeadOptions.label_propagation_params` hands to :func:`ovss_fast.label_propagation` without the prefix;
#: ``pixel_propagation``: refine "lposs+"'s ``lposs_radius`` / ``lposs_tau``, with the patch stage's alpha, iters
#: and tol as LPOSS shares them, :meth:`HeadOptions.pixel_propagation_params`)
OPS = ("class_distributions", "discrepancy", "jbu", "refine", "label_propagation", "pixel_propagation")
#: the prefix of the LPOSS options (``lposs_k`` is label_propagation's ``k``)
LPOSS_PREFIX = "lposs_"

Check = Callable[[str, Any], Any]


def option(default: Any, op: str, checker: Check, help: str, *, choices: Sequence[str] | None = None,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A HeadOptions field: its default, the op that takes it, its check and its help (and choices, and how a
    command-line value is parsed when not by the default's type)."""
    assert op in OPS, op
    return field(default=default, metadata={"op": op, "check": checker, "help": help, "choices": choices,
                                            "parse": parse or type(default)})


def at_least(minimum: int, why: str = "") -> Check:
    return lambda name, value: check.count(name, value, minimum=minimum, why=why)


def one_of(choices: Sequence[str]) -> Check:
    return lambda name, value: check.choice(name, value, choices)


def _nms(name: str, value: float) -> float:
    return check.nms_ratio(value, name)


def _radius(name: str, value: int) -> int:
    return check.radius(value, name)


def _dilations(name: str, value: Any) -> tuple[int, ...]:
    return check.dilations(value, name)


def _alpha(name: str, value: float) -> float:
    return check.propagation_alpha(value, name)


def _pixel_radius(name: str, value: int) -> int:
    return check.count(name, value, minimum=1, maximum=64)


def parse_ints(text: str) -> tuple[int, ...]:
    """A command-line list of integers, "8,16" or "8 16" -> (8, 16) (checked by the field's check)."""
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"expected integers separated by commas, such as 8,16; got {text!r}") from None


@dataclass(frozen=True)
class HeadOptions:
    """The head's knobs (method.md sections 1-4), checked when built; see the module docstring."""

    scale: float = option(100.0, "class_distributions", check.positive,
                          "logit scale of softmax(scale * cos) (default 100; protocols set their own)")
    nms: float = option(0.0, "class_distributions", _nms, "class-distribution NMS ratio in [0, 1] (default 0)")
    nms_axis: str = option("classes", "class_distributions", one_of(check.NMS_AXES),
                           "class-distribution NMS over classes (default) or patches", choices=check.NMS_AXES)
    eps: float = option(EPS, "discrepancy", check.positive,
                        f"entropic regularisation of the Gibbs kernel (default {EPS}, the paper's)")
    iters: int = option(ITERS, "discrepancy", at_least(1), f"Sinkhorn iterations for mode op (default {ITERS})")
    sk_iters: int = option(SK_ITERS, "discrepancy", at_least(1, check.SK_ITERS_WHY),
                           f"Sinkhorn iterations making the mv kernel doubly stochastic (default {SK_ITERS})")
    steps: int = option(STEPS, "discrepancy", at_least(1), f"Markov-chain steps for mode mv (default {STEPS})")
    readout: str = option("integrated", "discrepancy", one_of(check.READOUTS),
                          f"mv readout: {', '.join(check.READOUTS)} (default integrated)", choices=check.READOUTS)
    tau: float = option(TAU, "discrepancy", check.positive, f"mv velocity threshold (default {TAU})")
    transition: str = option("attention", "discrepancy", one_of(check.TRANSITIONS),
                             "mv transition made doubly stochastic: attention (default) or gibbs",
                             choices=check.TRANSITIONS)
    sigma_spatial: float = option(SIGMA_SPATIAL, "jbu", check.positive,
                                  f"JBU spatial sigma in patches (default {SIGMA_SPATIAL})")
    sigma_range: float = option(SIGMA_RANGE, "jbu", check.positive,
                                f"JBU range sigma on [0, 1] colours (default {SIGMA_RANGE})")
    radius: int = option(RADIUS, "jbu", _radius, f"JBU radius in patches (default {RADIUS})")
    refine: str = option("jbu", "refine", one_of(check.REFINERS),
                         "scores to the output size: jbu (joint bilateral upsampling of the patch grid, default), "
                         "bilinear (the peers' resize), pamr (bilinear, then PAMR on the normalised image: "
                         "NACLIP's default) or lposs+ (bilinear to the processed image, then LPOSS+'s pixel-stage "
                         "label propagation on it)", choices=check.REFINERS)
    pamr_iters: int = option(10, "refine", at_least(0), "PAMR iterations for refine pamr (default 10)")
    pamr_dilations: tuple = option((8, 16), "refine", _dilations,
                                   "PAMR dilations for refine pamr, e.g. 8,16 (default) or 1,2,4,8,12,24",
                                   parse=parse_ints)
    lposs_k: int = option(400, "label_propagation", at_least(1),
                          "head lposs: neighbours per patch in the kNN graph, itself included (default 400, LPOSS's)")
    lposs_gamma: float = option(3.0, "label_propagation", check.non_negative,
                                "head lposs: edge weight max(0, cos)^gamma (default 3, LPOSS's)")
    lposs_sigma: float = option(0.01, "label_propagation", check.non_negative,
                                "head lposs: edge weight times exp(-sigma dist^dist_pow), dist in pixels between "
                                "patch centres (default 0.01, LPOSS's)")
    lposs_dist_pow: float = option(1.0, "label_propagation", check.positive,
                                   "head lposs: the power of the patch distance (default 1, LPOSS's)")
    lposs_alpha: float = option(0.95, "label_propagation", _alpha,
                                "head lposs and refine lposs+: propagation strength alpha in [0, 1) of "
                                "(I - alpha S) x = y0 (default 0.95, LPOSS's)")
    lposs_iters: int = option(10, "label_propagation", at_least(1, "(0 conjugate-gradient steps leave every score 0)"),
                              "head lposs and refine lposs+: conjugate-gradient steps at most (default 10, LPOSS's)")
    lposs_tol: float = option(1e-6, "label_propagation", check.non_negative,
                              "head lposs and refine lposs+: a class stops once ||r|| <= tol ||y0|| (default 1e-6, "
                              "LPOSS's)")
    lposs_radius: int = option(6, "pixel_propagation", _pixel_radius,
                               "refine lposs+: pixel neighbours within this radius, a (2r+1)^2 square (default 6: "
                               "LPOSS's 13 x 13)")
    lposs_tau: float = option(0.01, "pixel_propagation", check.positive,
                              "refine lposs+: pixel weight exp(-||Lab_i - Lab_j|| / tau) (default 0.01, LPOSS's)")

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars become Python numbers, bad values fail here
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, where: str, options: Mapping[str, Any]) -> HeadOptions:
        """HeadOptions from keywords, a TypeError naming ``where`` and the valid names for an unknown one."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise InputTypeError(f"{where} got unknown parameters {unknown}; the head's options are "
                            f"{', '.join(cls.names())}")
        return cls(**options)

    def for_op(self, op: str) -> dict[str, Any]:
        """The keywords of one op (``class_distributions``, ``discrepancy`` or ``jbu``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["op"] == op}

    def pamr_params(self) -> dict[str, Any]:
        """:func:`ovss_fast.pamr`'s keywords: ``iters`` and ``dilations``."""
        return {"iters": self.pamr_iters, "dilations": self.pamr_dilations}

    def label_propagation_params(self) -> dict[str, Any]:
        """:func:`ovss_fast.label_propagation`'s keywords (k, gamma, sigma, dist_pow, alpha, iters, tol)."""
        return {k[len(LPOSS_PREFIX):]: v for k, v in self.for_op("label_propagation").items()}

    def pixel_propagation_params(self) -> dict[str, Any]:
        """:func:`ovss_fast.pixel_propagation`'s keywords: radius and tau, and alpha, iters and tol shared with the
        patch stage (LPOSS uses one alpha and one conjugate-gradient setting for both stages)."""
        shared = {k: v for k, v in self.label_propagation_params().items() if k in ("alpha", "iters", "tol")}
        return {**{k[len(LPOSS_PREFIX):]: v for k, v in self.for_op("pixel_propagation").items()}, **shared}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def paper(cls, **overrides: Any) -> HeadOptions:
        """The head as the paper states it (:data:`PAPER_HEAD`: readout velocity, transition attention, tau 0.3,
        eps 0.1, iters 50, sk_iters 15, NMS on by our reading of its rule); the fields the paper does not state
        keep our defaults; ``overrides`` replace any field (checked like every field)."""
        return cls.of("HeadOptions.paper", {**PAPER_HEAD, **overrides})


#: the presets of the head (and of the Segmenter, which adds the affinity, the mode and the whole image):
#: "ours" (the defaults above) and "paper" (:meth:`HeadOptions.paper`)
PRESETS = ("ours", "paper")
#: the NMS ratio of the paper preset: the paper turns NMS on ("suppress low-confidence patches") without
#: giving its rule or ratio; our reading is method.md's nms_axis="patches" at the ratio where + NMS scores
#: best on that axis in the synthetic ablation (bench/RESULTS.md, "Synthetic ablation", NMS side table)
PAPER_NMS_RATIO = 0.2
#: the head options whose value the paper states (method.md, "What the full paper reports"); the NMS ratio
#: and axis are our reading of a rule it states only in words
PAPER_HEAD: dict[str, Any] = {"readout": "velocity", "transition": "attention", "tau": 0.3, "eps": 0.1,
                              "iters": 50, "sk_iters": 15, "nms": PAPER_NMS_RATIO, "nms_axis": "patches"}


def preset_head(preset: str) -> dict[str, Any]:
    """The head-option values a preset sets (``ours``: none, the defaults)."""
    check.choice("preset", preset, PRESETS)
    return dict(PAPER_HEAD) if preset == "paper" else {}


def flag(name: str) -> str:
    """The command-line flag of an option: ``sk_iters`` -> ``--sk-iters``."""
    return "--" + name.replace("_", "-")


__all__ = ["LPOSS_PREFIX", "OPS", "PAPER_HEAD", "PAPER_NMS_RATIO", "PRESETS", "HeadOptions", "at_least", "flag",
           "one_of", "option", "parse_ints", "preset_head"]

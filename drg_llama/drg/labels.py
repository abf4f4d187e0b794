"""Label spaces: how DRGs become model outputs and how model outputs become a distribution over DRGs.

One :class:`LabelSpace` object is built by the data module and handed to the model, so data and model cannot
disagree about classes. It owns both directions:

* ``single_label``: one output per DRG class; the distribution over DRGs is the softmax.
* ``two_label``: ``n_base + 3`` outputs — a base-DRG head and a {NONE, CC, MCC} severity head over one score
  layer. The severity target is the DRG's *allowed set* (292 -> {CC}; 872 -> {NONE, CC}), trained with a
  partial-label loss, and decoding is joint over valid DRGs::

      score(d) = log p(base(d)) + log sum_{s in allowed(d)} p(s)

  Because each family's allowed sets partition {NONE, CC, MCC}, ``exp(score)`` sums to one over the DRGs of the
  space's families: a proper distribution, so top-k, F1 and AUC are defined for the recombined prediction.

DRG-LLaMA's decode (argmax of each head, recombined) is :meth:`LabelSpace.argmax_decode`, kept for comparison.

Per-DRG facts (base DRG, severity set, MDC, CMS weight) have one source, :class:`DRGFacts`: a label space's
``class_facts`` for its classes and ``facts(codes)`` for any DRG of its version. The coarse metrics, the analysis
and the reasoner's rewards (which score any DRG of the version) all read them there.

The decode functions accept numpy arrays or torch tensors and return the same kind; torch is never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from drg_llama.drg.tables import ERROR_DRGS, SEVERITIES, Severity, get_table, resolve_version

Variant = Literal["single_label", "two_label"]
VARIANTS: tuple[str, ...] = ("single_label", "two_label")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _log_softmax(x):
    if _is_torch(x):
        return x.log_softmax(-1)
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logsumexp(x, axis: int):
    if _is_torch(x):
        return x.logsumexp(axis)
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis) + np.log(np.exp(x - peak).sum(axis))


def _like(array: np.ndarray, ref):
    """``array`` as the same kind (numpy / torch on the same device) as ``ref``."""
    if _is_torch(ref):
        import torch  # only reached when the caller already uses torch

        return torch.as_tensor(array, device=ref.device, dtype=ref.dtype if array.dtype.kind == "f" else None)
    return array


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one run and the mapping between DRGs and model outputs.

    Attributes:
        version: MS-DRG version the classes belong to ("v43").
        variant: ``single_label`` or ``two_label``.
        drgs: DRG classes, sorted; every distribution over DRGs is indexed like this.
        bases: base DRGs (two_label only; empty for single_label).
        class_facts: base DRG, severity set, MDC and CMS weight of each class, indexed like ``drgs`` (computed once,
            the one source the coarse metrics, the analysis and the reasoner's rewards read).
    """

    version: str
    variant: Variant
    drgs: tuple[int, ...]
    bases: tuple[int, ...] = ()

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if bad := sorted(set(self.drgs) & ERROR_DRGS):
            raise ValueError(f"grouper error DRGs {bad} cannot be classes")
        table = get_table(self.version)
        for code in self.drgs:
            table[code]  # an unknown code fails here, naming the version
        facts = DRGFacts.of(self.drgs, self.version)
        # Computed once (the dataclass is frozen, hence object.__setattr__): the facts, and the index arrays that
        # every decode uses.
        object.__setattr__(self, "class_facts", facts)
        base_pos = {b: i for i, b in enumerate(self.bases)}
        if self.variant == "two_label":
            missing = [d for d, b in zip(self.drgs, facts.base.tolist()) if b not in base_pos]
            if missing:
                raise ValueError(f"DRGs {missing[:5]} have no base in the label space")
        object.__setattr__(self, "_index", {d: i for i, d in enumerate(self.drgs)})
        object.__setattr__(self, "_base_pos", base_pos)
        mask = np.array([[s.value in allowed for s in SEVERITIES] for allowed in facts.severities], dtype=bool)
        object.__setattr__(self, "allowed_mask", mask.reshape(len(self.drgs), len(SEVERITIES)))  # [D, 3]
        object.__setattr__(
            self, "drg_base_index", np.array([base_pos.get(b, -1) for b in facts.base.tolist()], dtype=np.int64)
        )

    # ----------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def build(cls, version: str, variant: Variant, drgs: Iterable[int] | None = None) -> LabelSpace:
        """Label space for ``drgs`` (e.g. those present in the training split), or the whole table if None.

        For two_label the DRG classes are *all* members of the families of the given DRGs: the joint decoder can
        assign any severity to any base, so every member must be a class.
        """
        version = resolve_version(version)
        table = get_table(version)
        codes = sorted({int(d) for d in (drgs if drgs is not None else table.codes)} - ERROR_DRGS)
        for code in codes:
            table[code]  # unknown codes fail here with the version in the message
        if variant == "two_label":
            bases = tuple(sorted({table.base(c) for c in codes}))
            members = sorted({m for b in bases for m in table.family(b).members} - ERROR_DRGS)
            return cls(version, variant, tuple(members), bases)
        return cls(version, variant, tuple(codes))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "variant": self.variant, "drgs": list(self.drgs), "bases": list(self.bases)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpace:
        return cls(data["version"], data["variant"], tuple(data["drgs"]), tuple(data.get("bases", ())))

    # ----------------------------------------------------------------------------------------------------------
    # sizes and encoding

    @property
    def num_classes(self) -> int:
        """Number of DRG classes (the width of every distribution over DRGs)."""
        return len(self.drgs)

    @property
    def num_outputs(self) -> int:
        """Width of the model's score layer: one per DRG, or n_base + 3."""
        return len(self.drgs) if self.variant == "single_label" else len(self.bases) + len(SEVERITIES)

    def __contains__(self, drg: object) -> bool:
        return drg in self._index

    def index(self, drg: int) -> int:
        """Position of DRG ``drg`` in :attr:`drgs`."""
        try:
            return self._index[int(drg)]
        except KeyError:
            raise KeyError(f"DRG {drg} is not a class of this {self.variant} label space ({self.version})") from None

    def encode(self, drg: int) -> tuple[int, int, tuple[bool, bool, bool]]:
        """Targets for one DRG: (class index, base index or -1, allowed-severity mask over NONE/CC/MCC)."""
        i = self.index(drg)
        return i, int(self.drg_base_index[i]), tuple(bool(x) for x in self.allowed_mask[i])

    def decode(self, indices: Sequence[int]) -> list[int]:
        """DRG codes of class indices."""
        return [self.drgs[int(i)] for i in indices]

    # ----------------------------------------------------------------------------------------------------------
    # decoding model outputs

    def split_logits(self, logits):
        """(base logits [N, B], severity logits [N, 3]) of a two_label output [N, B + 3]."""
        n_base = len(self.bases)
        return logits[..., :n_base], logits[..., n_base:]

    def drg_log_probs(self, logits):
        """Log-probabilities over :attr:`drgs` [N, D] from model outputs [N, num_outputs]."""
        if self.variant == "single_label":
            return _log_softmax(logits)
        base_logits, sev_logits = self.split_logits(logits)
        return self.joint_log_scores(_log_softmax(base_logits), _log_softmax(sev_logits))

    def joint_log_scores(self, base_log_probs, severity_log_probs):
        """score(d) = log p(base(d)) + log sum_{s in allowed(d)} p(s), for every DRG class d.

        Args:
            base_log_probs: [N, B] log-probabilities over :attr:`bases`.
            severity_log_probs: [N, 3] log-probabilities over NONE, CC, MCC.

        Returns:
            [N, D] log-scores; they exponentiate to a distribution over :attr:`drgs`.
        """
        if self.variant != "two_label":
            raise ValueError("joint decoding needs a two_label label space")
        log_mask = _like(np.where(self.allowed_mask, 0.0, -math.inf), severity_log_probs)  # [D, 3]
        sev = _logsumexp(severity_log_probs[..., None, :] + log_mask, -1)  # [N, D]
        return base_log_probs[..., _like(self.drg_base_index, base_log_probs)] + sev

    def argmax_decode(self, logits) -> list[int]:
        """DRG-LLaMA-style decode: argmax of each head independently, then the family rule.

        With {NONE, CC, MCC} severities every (base, severity) pair is a valid DRG, so no fallback is needed;
        DRG-LLaMA's five family-dependent codes needed one (see :func:`drg_llama_severity_code`).
        """
        if self.variant == "single_label":
            return self.decode(np.asarray(_to_numpy(logits)).argmax(-1))
        base_logits, sev_logits = (np.asarray(_to_numpy(x)) for x in self.split_logits(logits))
        table = get_table(self.version)
        return [
            table.recombine(self.bases[b], SEVERITIES[s]) for b, s in zip(base_logits.argmax(-1), sev_logits.argmax(-1))
        ]

    # ----------------------------------------------------------------------------------------------------------
    # per-class facts: the one source for the coarse metrics, the analysis and the reasoner's rewards

    def facts(self, codes: Iterable[int]) -> DRGFacts:
        """The same facts for any DRG codes of this space's version, classes or not (a gold DRG unseen in training)."""
        return DRGFacts.of(codes, self.version)


@dataclass(frozen=True, eq=False)
class DRGFacts:
    """What coarse scoring compares about DRGs, one entry per code in the order given.

    A code that is not a DRG of the version gets base -1, no severity, MDC ``"?"`` and weight NaN, so it never
    agrees with a real DRG.

    Attributes:
        base: ``[N]`` int64 base DRG (first code of the family, as the grouper reports it).
        severities: ``[N]`` object: frozenset of the effective severities the DRG admits ("NONE", "CC", "MCC").
        mdc: ``[N]`` object: major diagnostic category ("05", "PRE"; "" where CMS assigns none).
        weight: ``[N]`` float64 CMS relative weight, NaN where the version's tables publish none.
    """

    base: np.ndarray
    severities: np.ndarray
    mdc: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, codes: Iterable[int], version: str) -> DRGFacts:
        """The facts of ``codes`` under MS-DRG ``version`` (the label space's :meth:`LabelSpace.facts` calls this)."""
        table = get_table(version)
        rows = []
        for code in codes:
            if code is not None and int(code) in table:
                drg = table[int(code)]
                allowed = frozenset(s.value for s in table.allowed_severities(drg.code))
                weight = drg.weight if drg.weight is not None else math.nan
                rows.append((table.base(drg.code), allowed, drg.mdc, weight))
            else:
                rows.append((-1, frozenset(), "?", math.nan))
        severities = np.empty(len(rows), dtype=object)
        severities[:] = [r[1] for r in rows]  # element-wise: numpy would otherwise try to unpack the sets
        return cls(
            base=np.array([r[0] for r in rows], dtype=np.int64),
            severities=severities,
            mdc=np.array([r[2] for r in rows], dtype=object),
            weight=np.array([r[3] for r in rows], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.base)

    def take(self, index: Any) -> DRGFacts:
        """The facts at positions ``index`` (e.g. the top-1 class of each row)."""
        index = np.asarray(index, dtype=np.int64)
        return DRGFacts(self.base[index], self.severities[index], self.mdc[index], self.weight[index])

    def agreement(self, other: DRGFacts) -> dict[str, np.ndarray]:
        """Position by position, whether two lists of DRGs share the base, the severity set and the MDC.

        Returns:
            ``{"base": [N] bool, "severity": [N] bool, "mdc": [N] bool}``.
        """
        if len(self) != len(other):
            raise ValueError(f"cannot compare the facts of {len(self)} DRGs with those of {len(other)}")
        known = self.base >= 0  # an unknown code on both sides must not count as agreement
        return {
            "base": known & (self.base == other.base),
            "severity": known & np.array([a == b for a, b in zip(self.severities, other.severities)], dtype=bool),
            "mdc": known & (self.mdc == other.mdc),
        }


def _to_numpy(x):
    return x.detach().float().cpu().numpy() if _is_torch(x) else x


# DRG-LLaMA's five severity codes (family dependent), kept to compare with the paper's two-label scheme.
DRG_LLAMA_CODES: dict[frozenset[Severity], int] = {
    frozenset({Severity.NONE}): 0,  # without CC/MCC
    frozenset({Severity.CC}): 1,  # with CC
    frozenset({Severity.CC, Severity.MCC}): 1,  # with CC/MCC
    frozenset({Severity.MCC}): 2,  # with MCC
    frozenset({Severity.NONE, Severity.CC}): 3,  # without MCC
    frozenset(SEVERITIES): 4,  # no split
}


def drg_llama_severity_code(drg: int, version: str = "v43") -> int:
    """DRG-LLaMA's 5-valued severity code of a DRG (0 w/o CC/MCC, 1 w CC or w CC/MCC, 2 w MCC, 3 w/o MCC, 4 none)."""
    return DRG_LLAMA_CODES[get_table(version).allowed_severities(drg)]


def drg_llama_decode(base: int, code: int, version: str = "v43") -> int:
    """Recombine a base DRG and a DRG-LLaMA severity code, with a fallback for pairs the family does not have.

    The fallback (our reconstruction; the paper describes fallbacks but not their order) reads the code as the
    most specific severity it names — 0/3/4 -> NONE, 1 -> CC, 2 -> MCC — and takes the family member that
    admits it, which always exists.
    """
    table = get_table(version)
    for member in table.family(base).members:
        if DRG_LLAMA_CODES[table.allowed_severities(member)] == code:
            return member
    fallback = {0: Severity.NONE, 1: Severity.CC, 2: Severity.MCC, 3: Severity.NONE, 4: Severity.NONE}[code]
    return table.recombine(base, fallback)

"""Chest anatomy findings and anatomy-pathology prompting (Chen et al., MICCAI 2024), offline:
findings -> ranked reports; and the cardiothoracic-ratio check of generated images.

The paper has an LLM write descriptive reports from anatomy words (lobes, heart, mediastinum) and
pathology words (opacity, nodule, ...). Here, with no LLM and no report corpus, the same module is
built from what is known of each real image:

* **findings** (:func:`derive_findings`): from its metadata (sex, age group, nodule, diagnosis)
  and, for the images whose masks a run may use, from its masks (:func:`measure_mask`: the
  cardiothoracic ratio -> heart size, lung-field height -> lung volume, left/right area ratio ->
  symmetry, heart centroid -> heart position);
* **a report grammar** (config: sentence variants per finding value, synonyms, random sentence
  order) that turns findings into several candidate reports;
* **ranking** of the candidates by text-embedding similarity (the project's offline MiniLM) to a
  canonical statement of the findings; a prompt is drawn among the top-ranked ones.

Findings travel as metadata: the fit entry adds the mask-derived words to each training image's
``meta`` (:class:`FindingsSource`), generation draws them jointly from the training images'
findings or takes the asked ones. Every report names the class phrases ("left lung", "right
lung", "heart") once, in its class sentence, so DiffMask's attention masks keep working; finding
sentences never use a class phrase. Dropping a field (``drop_fields``, prompt dropout) removes its
sentence: at p = 1 the report is the neutral prompt (opener + class sentence), which is also what
an image folder without metadata gets.

The CTR of a predicted mask against the heart size a prompt asked for (:func:`ctr_error`,
:func:`anatomy_report`) is the anatomical accuracy of ``diffmask-evaluate-synthesis``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from diffmask.domains.chest.labels import CHEST_CLASS_NAMES
from diffmask.domains.chest.prompt import CHEST_PROMPT, SEX_WORDS
from diffmask.prompts.builder import BuiltPrompt, PromptBuilder

log = logging.getLogger(__name__)

__all__ = [
    "AnatomyPathologyPrompts",
    "FindingRules",
    "FindingsSource",
    "MASK_FIELDS",
    "META_FIELDS",
    "MaskMeasures",
    "anatomy_report",
    "ctr_error",
    "ctr_interval",
    "derive_findings",
    "measure_mask",
]

META_FIELDS = ("sex", "age_group", "nodule", "diagnosis")
MASK_FIELDS = ("heart_size", "lung_volume", "lung_symmetry", "heart_position")
FIELDS = META_FIELDS + MASK_FIELDS
MASK_CLASSES = ("left_lung", "right_lung", "heart")


@dataclass(frozen=True)
class MaskMeasures:
    """What a label map says about the anatomy (ratios: independent of the image size).

    Attributes:
        ctr: cardiothoracic ratio: the heart's widest horizontal extent over the lungs' (outer
            lung edges, the internal thoracic diameter).
        lung_height: the taller lung field's height over the image height.
        area_ratio: left lung area / right lung area (about 0.8 on a normal PA film: the heart
            sits on the left).
        heart_offset: (heart centroid x - thorax centre x) / thoracic width, positive toward the
            patient's left (the image's right).
    """

    ctr: float
    lung_height: float
    area_ratio: float
    heart_offset: float


def measure_mask(label: np.ndarray, class_names: Sequence[str] = CHEST_CLASS_NAMES) -> MaskMeasures:
    """Measure a (H, W) label map with left lung, right lung and heart classes.

    Raises:
        ValueError: the class names lack one of the three classes, or a class is absent.
    """
    names = list(class_names)
    missing = [c for c in MASK_CLASSES if c not in names]
    if missing:
        raise ValueError(
            f"class_names: anatomy findings need the classes {list(MASK_CLASSES)}; "
            f"{missing} missing from {names}"
        )
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label: expected a (H, W) label map, got shape {label.shape}")
    masks = {c: label == names.index(c) for c in MASK_CLASSES}
    empty = [c for c, m in masks.items() if not m.any()]
    if empty:
        raise ValueError(f"label: class(es) {empty} absent; findings need every class in the mask")

    def x_extent(m: np.ndarray) -> tuple[int, int]:
        cols = np.flatnonzero(m.any(0))
        return int(cols[0]), int(cols[-1])

    def height(m: np.ndarray) -> int:
        rows = np.flatnonzero(m.any(1))
        return int(rows[-1] - rows[0] + 1)

    lungs = masks["left_lung"] | masks["right_lung"]
    lx0, lx1 = x_extent(lungs)
    hx0, hx1 = x_extent(masks["heart"])
    thoracic = lx1 - lx0 + 1
    heart_cx = float(np.nonzero(masks["heart"])[1].mean())
    return MaskMeasures(
        ctr=(hx1 - hx0 + 1) / thoracic,
        lung_height=max(height(masks["left_lung"]), height(masks["right_lung"])) / label.shape[0],
        area_ratio=float(masks["left_lung"].sum()) / float(masks["right_lung"].sum()),
        # the patient's left is the image's right: + = toward the patient's left
        heart_offset=(heart_cx - (lx0 + lx1) / 2.0) / thoracic,
    )


def _bin(value: float, edges: Sequence[float], words: Sequence[str]) -> str:
    """``words[i]`` for the i-th interval of ``edges`` (ascending; len(words) = len(edges) + 1)."""
    return words[int(np.searchsorted(np.asarray(edges, float), value, side="right"))]


@dataclass(frozen=True)
class FindingRules:
    """Thresholds that turn measures and metadata into finding words (config ``prompts.rules``)."""

    heart_size: Mapping[str, float]       # {borderline: CTR, enlarged: CTR}
    lung_volume: Mapping[str, float]      # {normal: height, high: height}
    lung_symmetry: Mapping[str, float]    # {symmetric: ratio, right smaller: ratio}
    heart_position: Mapping[str, float]   # {midline: offset, normal: offset}
    age_groups: Mapping[str, float]       # {middle aged: years, elderly: years}
    nodule: Mapping[str, str]             # raw ``finding`` value -> nodule word
    # diagnosis word -> substrings of the raw diagnosis (spaces removed)
    diagnosis: Mapping[str, Sequence[str]]

    # the word below the first threshold of each measure
    LOWEST = {"heart_size": "normal", "lung_volume": "low", "lung_symmetry": "left smaller",
              "heart_position": "shifted right", "age_groups": "young"}

    def words(self, field: str) -> list[str]:
        """The words a finding field can take, lowest bin first for the measured ones.

        Args:
            field: a finding field (``sex``, ``age_group``, ``nodule``, ``diagnosis``, or a
                measure: ``heart_size``, ``lung_volume``, ``lung_symmetry``, ``heart_position``).
        """
        if field in ("sex",):
            return list(dict.fromkeys(SEX_WORDS.values()))
        if field == "age_group":
            return [self.LOWEST["age_groups"], *self.age_groups]
        if field == "nodule":
            return sorted(set(self.nodule.values()))
        if field == "diagnosis":
            return list(self.diagnosis)
        return [self.LOWEST[field], *getattr(self, field)]

    def bin(self, field: str, value: float) -> str:
        """The word of the interval ``value`` falls in.

        Args:
            field: a measured field or ``age_group``.
            value: the measure (CTR, relative lung height, area ratio, heart offset) or the age.
        """
        table = self.age_groups if field == "age_group" else getattr(self, field)
        lowest = self.LOWEST["age_groups" if field == "age_group" else field]
        return _bin(value, list(table.values()), [lowest, *table])


def derive_findings(meta: Mapping[str, object], rules: FindingRules,
                    measures: MaskMeasures | None = None) -> dict[str, str]:
    """Finding words of one image: metadata fields always, mask fields when ``measures`` is given.

    Unknown or missing values are left out (the report then has no sentence for them).
    """
    meta = {str(k): ("" if v is None else str(v).strip()) for k, v in (meta or {}).items()}
    out: dict[str, str] = {}
    sex = SEX_WORDS.get(meta.get("sex", "").lower())
    if sex:
        out["sex"] = sex
    if meta.get("age", "").isdigit():
        out["age_group"] = rules.bin("age_group", float(meta["age"]))
    nodule = rules.nodule.get(" ".join(meta.get("finding", "").lower().split()))
    if nodule:
        out["nodule"] = nodule
    raw = re.sub(r"[^a-z]", "", meta.get("diagnosis", "").lower())
    for word, keys in rules.diagnosis.items():
        if raw and any(k in raw for k in keys):
            out["diagnosis"] = word
            break
    if measures is not None:
        out["heart_size"] = rules.bin("heart_size", measures.ctr)
        out["lung_volume"] = rules.bin("lung_volume", measures.lung_height)
        out["lung_symmetry"] = rules.bin("lung_symmetry", measures.area_ratio)
        out["heart_position"] = rules.bin("heart_position", measures.heart_offset)
    return out


# ---- the CTR of generated images (diffmask-evaluate-synthesis) ---------------------------------
def ctr_interval(word: str, rules: FindingRules) -> tuple[float, float]:
    """The CTR interval of a heart-size word."""
    words = rules.words("heart_size")
    if word not in words:
        raise ValueError(f"heart_size: unknown word {word!r}; expected one of {words}")
    edges = [-np.inf, *rules.heart_size.values(), np.inf]
    i = words.index(word)
    return float(edges[i]), float(edges[i + 1])


def ctr_error(measured: float, asked: str, rules: FindingRules) -> float:
    """Distance of a measured CTR from the asked heart-size word's interval (0 inside it)."""
    lo, hi = ctr_interval(asked, rules)
    return float(max(lo - measured, measured - hi, 0.0))


def anatomy_report(
    predictions: Sequence[np.ndarray],
    metas: Sequence[Mapping[str, object]],
    rules: FindingRules,
    class_names: Sequence[str],
) -> dict:
    """CTR of each predicted mask and its error against the asked ``heart_size`` (where asked)."""
    ctrs, errors, hits, failed = [], [], [], 0
    for pred, meta in zip(predictions, metas, strict=True):
        try:
            m = measure_mask(pred, class_names)
        except ValueError:
            failed += 1  # a class the segmenter did not find: no measurement
            continue
        ctrs.append(m.ctr)
        asked = str((meta or {}).get("heart_size") or "")
        if asked:
            err = ctr_error(m.ctr, asked, rules)
            errors.append(err)
            hits.append(err == 0.0)
    return {
        "n_measured": len(ctrs),
        "n_unmeasurable": failed,
        "ctr_mean": float(np.mean(ctrs)) if ctrs else float("nan"),
        "n_asked": len(errors),
        "ctr_error_median": float(np.median(errors)) if errors else float("nan"),
        "heart_size_accuracy": float(np.mean(hits)) if hits else float("nan"),
    }


class FindingsSource:
    """A sample source whose ``meta`` also carries each image's mask-derived finding words.

    Wraps the fit's real source: ``findings`` maps sample ids to their words (only the images
    whose masks the run may use); other images keep their plain metadata.
    """

    def __init__(self, base, findings: Mapping[str, Mapping[str, str]]):
        self.base = base
        self.findings = {str(k): dict(v) for k, v in findings.items()}
        self.name = base.name

    def __getattr__(self, item):  # ids(), class_names, ... of the wrapped source
        return getattr(self.base, item)

    def load(self, sample_id: str):
        """The wrapped source's sample, its ``meta`` extended by the image's finding words (if any)."""
        sample = self.base.load(sample_id)
        extra = self.findings.get(str(sample_id))
        if extra:
            sample.meta = {**sample.meta, **extra}
        return sample


@dataclass(frozen=True)
class _Report:
    sentences: tuple[tuple[str, str], ...]  # (field or "opener"/"classes", text)


class AnatomyPathologyPrompts(PromptBuilder):
    """Reports written from anatomy and pathology findings (``prompts=anatomy_pathology``).

    Args:
        grammar: ``opener`` and ``classes`` (lists of sentence variants; ``classes`` sentences hold
            ``{classes}``) and, per finding field, ``{value: [variants]}`` (``{value}`` in a
            variant is the value word).
        rules: :class:`FindingRules` fields (thresholds, raw-value maps).
        anatomy, pathology: the vocabularies (their words join the tokenizer's).
        class_names: label names, background first.
        num_candidates: candidate reports written per findings.
        top_k: a prompt is drawn among the ``top_k`` best-ranked candidates (1 = always the best).
        shuffle: random sentence order (the opener stays first).
        embedder: ranks candidates (``encode(texts) -> (N, D)`` unit rows); None = unranked.
        mask_findings: whose masks give findings at fit: ``labelled`` (the images the run may use
            the masks of: the alignment's labelled images; the honest choice for the 17-label
            regime), ``all`` (every training image's masks: the full-label setting), ``none``.
        findings_table: the training images' findings (generation draws from it); filled at fit.
        class_joiner, class_last_joiner: separators between class phrases.
        seed: seeds the candidate writing (same seed, same reports).
        known_values: accepted for the common prompt-builder interface and ignored (the finding
            words come from fixed vocabularies: nothing to learn).
    """

    TYPE = "anatomy_pathology"

    def __init__(
        self,
        grammar: Mapping[str, object],
        rules: Mapping[str, object],
        anatomy: Sequence[str] = (),
        pathology: Sequence[str] = (),
        class_names: Sequence[str] = CHEST_CLASS_NAMES,
        num_candidates: int = 8,
        top_k: int = 3,
        shuffle: bool = True,
        embedder=None,
        mask_findings: str = "labelled",
        findings_table: Sequence[Mapping[str, str]] = (),
        class_joiner: str = ", ",
        class_last_joiner: str = " and ",
        seed: int = 0,
        known_values: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__(**CHEST_PROMPT, class_names=class_names, class_joiner=class_joiner,
                         class_last_joiner=class_last_joiner)
        del known_values  # finding words come from fixed vocabularies: nothing to learn
        self.rules = FindingRules(**{k: dict(v) for k, v in dict(rules).items()})
        self.grammar = {str(k): v for k, v in dict(grammar).items()}
        for key in ("opener", "classes"):
            if not self.grammar.get(key):
                raise ValueError(f"prompts.grammar.{key}: expected a list of sentence variants")
        if not all("{classes}" in s for s in self.grammar["classes"]):
            raise ValueError("prompts.grammar.classes: every variant must contain {classes}")
        for field in FIELDS:
            table = self.grammar.get(field)
            if not isinstance(table, Mapping):
                raise ValueError(f"prompts.grammar.{field}: expected {{value: [sentence variants]}}")
            missing = [w for w in self.rules.words(field) if w not in table and "{value}" not in table]
            if missing:
                raise ValueError(f"prompts.grammar.{field}: no sentences for value(s) {missing}")
        lowered = [w.replace("_", " ") for w in self.class_words]
        for field in FIELDS:
            for variants in self.grammar[field].values():
                for s in variants:
                    if any(re.search(rf"\b{re.escape(c)}\b", s.lower()) for c in lowered):
                        raise ValueError(
                            f"prompts.grammar.{field}: {s!r} uses a class phrase; "
                            "only the class sentence may (the attention masks read its first occurrence)"
                        )
        if mask_findings not in ("labelled", "all", "none"):
            raise ValueError(f"prompts.mask_findings: expected labelled, all or none, got {mask_findings!r}")
        if num_candidates < 1 or not 1 <= top_k <= num_candidates:
            raise ValueError(f"prompts: expected num_candidates >= 1 and 1 <= top_k <= num_candidates, "
                             f"got {num_candidates}, {top_k}")
        self.anatomy = [str(w) for w in anatomy]
        self.pathology = [str(w) for w in pathology]
        self.num_candidates = num_candidates
        self.top_k = top_k
        self.shuffle = shuffle
        self.embedder = embedder
        self.mask_findings = mask_findings
        self.findings_table = [dict(f) for f in findings_table]
        self.seed = seed
        self._ranked: dict[tuple, list[_Report]] = {}

    # ---- findings --------------------------------------------------------------------------
    def check_findings(self, findings: Mapping[str, object], where: str = "findings") -> dict[str, str]:
        """Validate asked findings (names and values); returns them as words."""
        out = {}
        for name, value in dict(findings).items():
            if name not in FIELDS:
                raise ValueError(f"{where}: unknown finding {name!r}; expected one of {list(FIELDS)}")
            words = self.rules.words(name)
            if str(value) not in words:
                raise ValueError(f"{where}.{name}: unknown value {value!r}; expected one of {words}")
            out[name] = str(value)
        return out

    def findings(self, meta: Mapping[str, object] | None) -> dict[str, str]:
        """The findings of a ``meta``: finding words it carries, else derived from its raw metadata."""
        meta = dict(meta or {})
        out = derive_findings(meta, self.rules)
        for name in FIELDS:
            value = str(meta.get(name) or "")
            if value in self.rules.words(name):
                out[name] = value
        return out

    def derive(self, meta: Mapping[str, object], label: np.ndarray | None) -> dict[str, str]:
        """Findings of a real image (with ``label``: its mask fields too)."""
        measures = measure_mask(label, self.class_names) if label is not None else None
        return derive_findings(meta, self.rules, measures)

    # ---- reports ---------------------------------------------------------------------------
    def statement(self, findings: Mapping[str, str]) -> str:
        """The canonical statement that candidates are ranked against."""
        return "; ".join(f"{k.replace('_', ' ')}: {findings[k]}" for k in FIELDS if k in findings)

    def _sentence(self, field: str, value: str, rng: random.Random) -> str:
        table = self.grammar[field]
        variants = table.get(value) or table["{value}"]
        return rng.choice(list(variants)).replace("{value}", value)

    def _write(self, findings: Mapping[str, str], rng: random.Random) -> _Report:
        body = [(f, self._sentence(f, findings[f], rng)) for f in FIELDS if f in findings]
        body.append(("classes", rng.choice(list(self.grammar["classes"]))))
        if self.shuffle:
            rng.shuffle(body)
        return _Report((("opener", rng.choice(list(self.grammar["opener"]))), *body))

    def candidates(self, findings: Mapping[str, str]) -> list[_Report]:
        """Candidate reports of ``findings``, best-ranked first (cached; deterministic in seed)."""
        key = tuple(sorted(findings.items()))
        if key not in self._ranked:
            digest = hashlib.sha256(repr((self.seed, key)).encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            reports, seen = [], set()
            for _ in range(self.num_candidates * 4):
                report = self._write(findings, rng)
                if report.sentences not in seen:
                    seen.add(report.sentences)
                    reports.append(report)
                if len(reports) == self.num_candidates:
                    break
            if self.embedder is not None and len(reports) > 1 and findings:
                emb = np.asarray(self.embedder.encode([self.statement(findings)]
                                                      + [self._text(r, {})[0] for r in reports]))
                scores = emb[1:] @ emb[0]
                reports = [reports[i] for i in np.argsort(-scores, kind="stable")]
            self._ranked[key] = reports
        return self._ranked[key]

    def _text(self, report: _Report, drop: Mapping[str, bool]) -> tuple[str, tuple[tuple[int, int], ...]]:
        text, spans = "", []
        for field, sentence in report.sentences:
            if drop.get(field):
                continue
            if text:
                text += " "
            if field != "classes":
                text += sentence
                continue
            head, tail = sentence.split("{classes}", 1)
            text += head
            for i, word in enumerate(self.class_words):
                if i:
                    text += self.class_last_joiner if i == len(self.class_words) - 1 else self.class_joiner
                spans.append((len(text), len(text) + len(word)))
                text += word
            text += tail
        return text, tuple(spans)

    def build(self, meta: Mapping[str, object] | None = None, template: int | None = None,
              rng: random.Random | None = None, drop_fields: float = 0.0) -> BuiltPrompt:
        """A report for one image: drawn among the top-ranked candidates with ``rng`` (else the best).

        ``template`` picks a candidate by rank; ``drop_fields`` (with ``rng``) drops each finding's
        sentence with that probability.
        """
        if not 0.0 <= drop_fields <= 1.0:
            raise ValueError(f"drop_fields: expected a probability in [0, 1], got {drop_fields}")
        findings = self.findings(meta)
        reports = self.candidates(findings)
        if template is not None:
            if not 0 <= template < len(reports):
                raise ValueError(f"template: candidate {template} out of range (have {len(reports)})")
            report = reports[template]
        else:
            report = reports[rng.randrange(min(self.top_k, len(reports)))] if rng is not None else reports[0]
        drop = {}
        if rng is not None and drop_fields > 0:
            drop = {f: rng.random() < drop_fields for f in findings}
        text, spans = self._text(report, drop)
        return BuiltPrompt(text=text, class_spans=spans)

    def longest_report(self, tokenizer) -> tuple[str, int]:
        """The longest report the grammar can write (its longest variant of every field) and its
        token count with ``tokenizer``."""
        def count(text: str) -> int:
            return len(tokenizer(text)["input_ids"])

        joined = self.class_joiner.join(self.class_words[:-1]) + self.class_last_joiner + self.class_words[-1]
        parts = [max(self.grammar["opener"], key=count),
                 max((v.replace("{classes}", joined) for v in self.grammar["classes"]), key=count)]
        for field in FIELDS:
            table = self.grammar[field]
            parts.append(max((v.replace("{value}", w) for w in self.rules.words(field)
                               for v in (table.get(w) or table["{value}"])), key=count))
        text = " ".join(parts)
        return text, count(text)

    def check_length(self, tokenizer) -> None:
        """Raise when the longest report does not fit the text encoder (it would lose class tokens)."""
        text, n = self.longest_report(tokenizer)
        limit = tokenizer.model_max_length
        if n > limit:
            raise ValueError(
                f"prompts=anatomy_pathology: the longest report has {n} tokens, "
                f"the text encoder takes {limit} ({text!r}); "
                f"set diffusion.components.max_prompt_tokens>={n} (scratch model) or shorten prompts.grammar"
            )

    def neutral_prompt(self) -> BuiltPrompt:
        """The report with no findings (what an image without metadata gets)."""
        return self.build({})

    def sample_findings(
        self, rng: random.Random, asked: Mapping[str, object] | None = None
    ) -> dict[str, str]:
        """Findings for generation: a training image's (joint real distribution) + the asked ones."""
        base = {}
        if self.findings_table:
            base = dict(self.findings_table[rng.randrange(len(self.findings_table))])
        return {**base, **self.check_findings(asked or {})}

    # ---- fit-time hooks ----------------------------------------------------------------------
    def prepare_fit(self, tokenizer, datamodule, labelled_ids: Callable[[], Sequence[str]]) -> None:
        """Ready the report builder for a diffusion fit.

        Checks the reports' length against the tokenizer, puts the mask-derived findings of the
        images the fit may use into their metadata (``mask_findings``: ``labelled`` = the
        alignment's labelled images, ``all`` = every real training image, ``none`` = no image; the
        datamodule serves its real images through a :class:`FindingsSource` from then on), then
        learns the metadata values.

        Args:
            tokenizer: the model's tokenizer.
            datamodule: the fit's data.
            labelled_ids: returns the ids of the real training images whose masks the fit may use.
        """
        self.check_length(tokenizer)
        if self.mask_findings == "all":
            ids = list(datamodule.real_train_ids)
        elif self.mask_findings == "labelled":
            ids = list(labelled_ids())
        else:
            ids = []
        findings = {}
        for sid in ids:
            sample = datamodule.real.load(sid)
            derived = self.derive(sample.meta, sample.label)
            findings[sid] = {k: v for k, v in derived.items() if k in MASK_FIELDS}
        datamodule.set_real_source(FindingsSource(datamodule.real, findings))
        log.info("prompts: mask findings (%s) of %d training images", self.mask_findings, len(findings))
        super().prepare_fit(tokenizer, datamodule, labelled_ids)

    def learn_values(self, metas: Sequence[Mapping[str, object]]) -> None:
        """Record the training images' findings (generation draws from them)."""
        self.findings_table = [self.findings(m) for m in metas]

    def words(self) -> list[str]:
        """Every word a report can hold (the tokenizer's vocabulary for this builder), sorted."""
        parts = [*self.grammar["opener"], *self.grammar["classes"], *self.class_words]
        parts += [*self.anatomy, *self.pathology]
        for field in FIELDS:
            parts += list(self.rules.words(field))
            for variants in self.grammar[field].values():
                parts += list(variants)
        return sorted({w for p in parts for w in re.findall(r"[a-z]+", p.lower())})

    def to_dict(self) -> dict:
        """Constructor arguments as plain values (stored in an exported model's ``diffmask.json``)."""
        rules = {k: dict(getattr(self.rules, k)) for k in FindingRules.__dataclass_fields__}
        return {
            "type": self.TYPE,
            "grammar": {k: (list(v) if not isinstance(v, Mapping) else {a: list(b) for a, b in v.items()})
                        for k, v in self.grammar.items()},
            "rules": {
                k: ({a: list(b) for a, b in v.items()} if k == "diagnosis" else v) for k, v in rules.items()
            },
            "anatomy": self.anatomy,
            "pathology": self.pathology,
            "class_names": list(self.class_names),
            "num_candidates": self.num_candidates,
            "top_k": self.top_k,
            "shuffle": self.shuffle,
            "rank": self.embedder is not None,
            "mask_findings": self.mask_findings,
            "findings_table": self.findings_table,
            "class_joiner": self.class_joiner,
            "class_last_joiner": self.class_last_joiner,
            "seed": self.seed,
        }


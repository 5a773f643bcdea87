"""Prompt templates filled from sample metadata, keeping the character span of each class phrase.

The mask stage reads the cross-attention of each class phrase ("left lung", "right lung",
"heart"), so a prompt must say where those phrases are: :class:`PromptBuilder` records their
character spans while filling a template, and :func:`class_token_positions` turns the spans into
token positions for any tokenizer with offsets (our scratch CLIP-BPE tokenizer, SD's CLIPTokenizer).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from diffmask.labels import class_word, validate_class_names

__all__ = [
    "BuiltPrompt",
    "PromptBuilder",
    "class_token_positions",
    "locate_class_words",
]

FIELD_KEYS = ("neutral", "words", "format", "numeric")


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt and where its class phrases are.

    Attributes:
        text: the prompt.
        class_spans: one (start, end) character span per class (background excluded), in
            class order; ``text[start:end]`` is the class phrase. None for a class the prompt
            does not name because the image lacks it (``absent_when``): it has no token, so no
            attention map and an empty mask.
    """

    text: str
    class_spans: tuple[tuple[int, int] | None, ...]


class PromptBuilder:
    """Builds one prompt per sample from templates, its metadata and the class words.

    Template fields: ``{modality}`` (the dataset's noun: "a chest x-ray", "a breast ultrasound
    image"), ``{classes}`` (required: the class phrases joined as "left lung, right lung and
    heart"), and one field per metadata column named in ``fields`` (from ``Sample.meta``; a
    missing, empty or unknown value becomes the field's neutral word).

    Every dataset describes its own prompt (``data.prompt`` of ``conf/data/<name>.yaml``, read by
    ``conf/prompts/default.yaml``); the chest X-ray one is
    :func:`diffmask.domains.chest.chest_prompt_builder`.

    Args:
        templates: one or more templates; :meth:`build` picks one (the first unless an index
            or an RNG is given).
        class_names: label names, background first (background is never put in a prompt).
        modality: what ``{modality}`` says.
        class_words: class name -> its phrase in prompts (default: the name, ``_`` as a space).
        fields: per metadata field, how its value becomes words: ``neutral`` (the word for a
            missing value; required), ``words`` (lower-cased raw value -> word; a value not
            listed is neutral; without it the value is used as it is, lower-cased),
            ``format`` (e.g. ``"{value} year old"``), ``numeric`` (only whole numbers are used).
            None: no metadata fields (a prompt of the modality and the classes).
        class_joiner, class_last_joiner: separators between class phrases.
        absent_when: per class that may be missing from an image, the metadata values that say
            it is (``{lesion: {pathology: [normal]}}``): such an image's prompt does not name
            the class, so its attention map, and its mask, are empty. Decided on the sample's
            own metadata, never on dropped fields. Empty: every prompt names every class.
        none_phrase: what ``{classes}`` says when the image lacks every class ("normal tissue").
        known_values: per metadata field, the words the model was trained with
            (:meth:`learn_values`; recorded in ``diffmask.json``). A value outside them (an
            external hospital's "tuberculosis" for a JSRT model) becomes the field's neutral word:
            the model never saw it, while it did see the neutral word (``field_dropout`` at fit).
            None = every value is used.

    Examples::

        builder = chest_prompt_builder()  # diffmask.domains.chest
        p = builder.build({"sex": "M", "age": "53", "finding": "lung nodule"})
        p.text
        # 'a chest x-ray of a 53 year old male, lung nodule, showing the left lung, right lung and heart'
        p.text[slice(*p.class_spans[0])]  # 'left lung'
        us = PromptBuilder(
            ["{modality}, {pathology}, showing the {classes}"],
            ["background", "lesion"],
            modality="a breast ultrasound image",
            fields={"pathology": {"neutral": "breast tissue"}},
        )
        us.build({"pathology": "benign"}).text  # 'a breast ultrasound image, benign, showing the lesion'
    """

    def __init__(
        self,
        templates: Sequence[str],
        class_names: Sequence[str],
        modality: str,
        class_words: Mapping[str, str] | None = None,
        fields: Mapping[str, Mapping] | None = None,
        class_joiner: str = ", ",
        class_last_joiner: str = " and ",
        absent_when: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        none_phrase: str = "no finding",
        known_values: Mapping[str, Sequence[str]] | None = None,
    ):
        if isinstance(templates, str):
            templates = [templates]
        templates = [str(t) for t in templates]
        if not templates:
            raise ValueError("templates: expected at least one template")
        self.fields = self._check_fields(fields or {})
        allowed = {*self.fields, "classes", "modality"}
        for t in templates:
            used = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
            unknown = sorted(set(used) - allowed)
            if unknown:
                raise ValueError(
                    f"templates: {t!r} uses unknown field(s) {unknown}; allowed: {sorted(allowed)} "
                    "(a metadata column becomes a field when data.prompt.fields names it)"
                )
            if used.count("classes") != 1:
                raise ValueError(f"templates: {t!r} must contain the field {{classes}} exactly once")
        self.templates = tuple(templates)
        self.modality = str(modality)
        self.class_names = validate_class_names(class_names)
        words = dict(class_words or {})
        unknown = sorted(set(words) - set(self.class_names[1:]))
        if unknown:
            raise ValueError(f"class_words: {unknown} are not foreground classes of {list(self.class_names)}")
        self.class_words = tuple(str(words.get(n) or class_word(n)) for n in self.class_names[1:])
        self.neutral = {k: spec["neutral"] for k, spec in self.fields.items()}
        self.absent_when = {
            str(c): {str(f): sorted({str(v).lower() for v in vs}) for f, vs in dict(rule).items()}
            for c, rule in dict(absent_when or {}).items()
        }
        unknown = sorted(set(self.absent_when) - set(self.class_names[1:]))
        if unknown:
            raise ValueError(f"absent_when: {unknown} are not foreground classes of {list(self.class_names)}")
        self.none_phrase = str(none_phrase)
        clash = [w for w in self.class_words if any(locate_class_words(self.none_phrase, [w], [True]))]
        if clash:
            raise ValueError(
                f"none_phrase: {self.none_phrase!r} names the class {clash[0]!r}; "
                "a prompt would look as if it had one"
            )
        self.class_joiner = class_joiner
        self.class_last_joiner = class_last_joiner
        self.known_values = None if known_values is None else {
            str(k): sorted({str(v) for v in vs}) for k, vs in known_values.items()
        }
        if self.known_values is not None:
            unknown = sorted(set(self.known_values) - set(self.fields))
            if unknown:
                raise ValueError(
                    f"known_values: unknown field(s) {unknown}; expected some of {list(self.fields)}"
                )

    @staticmethod
    def _check_fields(fields: Mapping[str, Mapping]) -> dict[str, dict]:
        out = {}
        for name, spec in dict(fields).items():
            spec = dict(spec or {})
            unknown = sorted(set(spec) - set(FIELD_KEYS))
            if unknown or "neutral" not in spec:
                raise ValueError(
                    f"fields.{name}: expected keys {list(FIELD_KEYS)} with 'neutral' required, "
                    f"got {sorted(spec)}"
                )
            if name in ("classes", "modality"):
                raise ValueError(f"fields.{name}: the name is taken by the template field {{{name}}}")
            if "format" in spec and "{value}" not in str(spec["format"]):
                raise ValueError(f"fields.{name}.format: must contain {{value}}, got {spec['format']!r}")
            words = spec.get("words")
            out[str(name)] = {
                "neutral": str(spec["neutral"]),
                **({"words": {str(k).lower(): str(v) for k, v in words.items()}} if words else {}),
                **({"format": str(spec["format"])} if spec.get("format") else {}),
                **({"numeric": True} if spec.get("numeric") else {}),
            }
        return out

    def _raw_values(self, meta: Mapping[str, object] | None) -> dict[str, str]:
        meta = {str(k): ("" if v is None else str(v).strip()) for k, v in (meta or {}).items()}
        values = {}
        for key, spec in self.fields.items():
            raw = " ".join(meta.get(key, "").lower().split())
            if "words" in spec:
                value = spec["words"].get(raw, "")
            elif spec.get("numeric"):
                value = raw if raw.isdigit() else ""
            else:
                value = raw
            if value and "format" in spec:
                value = spec["format"].format(value=value)
            values[key] = value or spec["neutral"]
        return values

    def field_values(self, meta: Mapping[str, object] | None) -> dict[str, str]:
        """The words that fill the metadata fields (neutral words for missing or unknown values)."""
        values = self._raw_values(meta)
        for key, known in (self.known_values or {}).items():
            if values[key] != self.neutral[key] and values[key] not in known:
                values[key] = self.neutral[key]
        return values

    def prepare_fit(self, tokenizer, datamodule, labelled_ids: Callable[[], Sequence[str]]) -> None:
        """Ready the builder for a diffusion fit: learn the training images' metadata values.

        A domain's builder may do more here (the chest report builder checks its length against
        the tokenizer and adds findings derived from the labelled masks).

        Args:
            tokenizer: the model's tokenizer.
            datamodule: the fit's data (its ``train_metas()``; a domain's builder may also change
                the real source it serves).
            labelled_ids: returns the ids of the real training images whose masks the fit may use.
        """
        self.learn_values(datamodule.train_metas())

    def learn_values(self, metas: Sequence[Mapping[str, object]]) -> None:
        """Record the values of the fitting set's metadata as :attr:`known_values` (at fit time)."""
        seen: dict[str, set[str]] = {k: set() for k in self.fields}
        for meta in metas:
            for key, value in self._raw_values(meta).items():
                if value != self.neutral[key]:
                    seen[key].add(value)
        self.known_values = {k: sorted(v) for k, v in seen.items()}

    def absent_classes(self, meta: Mapping[str, object] | None) -> set[str]:
        """The classes the image lacks by its metadata (``absent_when``)."""
        meta = {str(k): " ".join(str(v or "").lower().split()) for k, v in (meta or {}).items()}
        return {c for c, rule in self.absent_when.items() if any(meta.get(f) in vs for f, vs in rule.items())}

    def build(self, meta: Mapping[str, object] | None = None, template: int | None = None,
              rng: random.Random | None = None, drop_fields: float = 0.0) -> BuiltPrompt:
        """Fill a template for one sample.

        Args:
            meta: the sample's metadata (``Sample.meta``); missing keys are fine.
            template: index of the template to use (default: random with ``rng``, else 0).
            rng: picks the template when ``template`` is None, and the dropped fields.
            drop_fields: with ``rng``, each metadata field becomes its neutral word with this
                probability (prompt dropout at fit: a prompt without metadata, as for another
                hospital's images, is then one the model has seen).
        """
        if template is None:
            template = rng.randrange(len(self.templates)) if rng is not None else 0
        if not 0 <= template < len(self.templates):
            raise ValueError(
                f"template: index {template} out of range (have {len(self.templates)} templates)"
            )
        if not 0.0 <= drop_fields <= 1.0:
            raise ValueError(f"drop_fields: expected a probability in [0, 1], got {drop_fields}")
        absent = self.absent_classes(meta)  # the image's own metadata: a dropped field does not change it
        values = self.field_values(meta)
        if drop_fields > 0 and rng is not None:
            values = {k: (self.neutral[k] if rng.random() < drop_fields else v) for k, v in values.items()}
        text, spans = "", []
        for literal, name, spec, _conv in string.Formatter().parse(self.templates[template]):
            text += literal
            if name is None:
                continue
            if name == "modality":
                text += format(self.modality, spec or "")
                continue
            if name != "classes":
                text += format(values[name], spec or "")
                continue
            named = [
                (c, w) for c, w in zip(self.class_names[1:], self.class_words, strict=True) if c not in absent
            ]
            where = {}
            for i, (c, word) in enumerate(named):
                if i:
                    text += self.class_last_joiner if i == len(named) - 1 else self.class_joiner
                where[c] = (len(text), len(text) + len(word))
                text += word
            if not named:
                text += self.none_phrase
            spans = [where.get(c) for c in self.class_names[1:]]
        return BuiltPrompt(text=text, class_spans=tuple(spans))

    def locate(self, text: str) -> BuiltPrompt:
        """Spans of the class phrases in a given prompt (see :func:`locate_class_words`); a class
        that may be absent (``absent_when``) and is not named gets None."""
        optional = [c in self.absent_when for c in self.class_names[1:]]
        return BuiltPrompt(text=text, class_spans=locate_class_words(text, self.class_words, optional))

    def to_dict(self) -> dict:
        """Constructor arguments as plain values (stored in an exported model's ``diffmask.json``)."""
        return {
            "templates": list(self.templates),
            "class_names": list(self.class_names),
            "modality": self.modality,
            "class_words": dict(zip(self.class_names[1:], self.class_words, strict=True)),
            "fields": {k: dict(v) for k, v in self.fields.items()},
            "class_joiner": self.class_joiner,
            "class_last_joiner": self.class_last_joiner,
            "absent_when": self.absent_when,
            "none_phrase": self.none_phrase,
            "known_values": self.known_values,
        }

    def words(self) -> list[str]:
        """Every word the templates, modality, field words and class words can produce."""
        parts = [re.sub(r"\{[^}]*\}", " ", t) for t in self.templates]
        parts += [self.modality, self.none_phrase, *self.class_words]
        for spec in self.fields.values():
            parts += [spec["neutral"], *spec.get("words", {}).values(), spec.get("format", "")]
        return sorted({w for p in parts for w in re.findall(r"[a-z]+", p.lower())})


def locate_class_words(
    text: str, class_words: Sequence[str], optional: Sequence[bool] | None = None
) -> tuple[tuple[int, int] | None, ...]:
    """Character span of the first whole-word, case-insensitive occurrence of each class phrase.

    Args:
        text: the prompt.
        class_words: the class phrases, in class order.
        optional: per class, whether the prompt may leave it out (a class the image may lack);
            such a class gets None when it is not named. Default: every class must be named.

    Raises:
        ValueError: a class phrase that is not optional does not occur in the prompt.
    """
    spans = []
    for i, word in enumerate(class_words):
        m = re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text.lower())
        if m is None and not (optional and optional[i]):
            raise ValueError(f"prompt {text!r}: class phrase {word!r} not found (every class must be named)")
        spans.append(None if m is None else m.span())
    return tuple(spans)


def class_token_positions(tokenizer, prompt: BuiltPrompt) -> list[list[int]]:
    """Token positions (in the padded ``input_ids``, BOS at 0) of each class phrase.

    Works for any fast tokenizer that returns offsets (our scratch CLIP-BPE tokenizer, SD's
    ``CLIPTokenizer``). A phrase split into several tokens gives several positions; users
    average (or sum) over them. A class the prompt does not name (span None) gets ``[]``.

    Raises:
        ValueError: the prompt is longer than ``tokenizer.model_max_length`` (it would be
            truncated and lose class tokens), or a class phrase maps to no token.
    """
    enc = tokenizer(prompt.text, return_offsets_mapping=True, truncation=False)
    n, limit = len(enc["input_ids"]), tokenizer.model_max_length
    if n > limit:
        raise ValueError(
            f"prompt {prompt.text!r} has {n} tokens, more than the tokenizer's maximum of {limit}; "
            "shorten the template or raise the tokenizer's model_max_length"
        )
    offsets = enc["offset_mapping"]
    positions = []
    for span in prompt.class_spans:
        if span is None:
            positions.append([])
            continue
        start, end = span
        pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not pos:
            raise ValueError(f"prompt {prompt.text!r}: no token covers characters {start}..{end}")
        positions.append(pos)
    return positions

"""A rule-based sentence splitter, as plain Python and as a MiniSBD-format ONNX model that Argos runs offline."""

from __future__ import annotations

import json
from pathlib import Path

# Character classes. The ONNX model sees characters through MiniSBD's vocabulary (unit -> id), so the
# vocabulary *is* the classifier: every character of a class maps to the class id; anything else is <UNK>.
PAD, OTHER, PERIOD, TERMINAL, CLOSER, LOWER, SPACE, DIGIT, UPPER = range(9)
_CLASS_NAMES = ["<PAD>", "<UNK>", "<PERIOD>", "<TERMINAL>", "<CLOSER>", "<LOWER>", "<SPACE>", "<DIGIT>", "<UPPER>"]
TERMINALS = "!?…‼⁇⁈⁉。！？"
# closing quotes and brackets that may stand between a sentence's terminal and the next sentence
# (German quotes close with “ and ‘, English ones with ” and ’; guillemets go either way)
CLOSERS = "\"'”“’‘»«)]}"
# Latin, Latin-1/Extended-A/B, Greek, Cyrillic: enough alphabets for the lowercase "no split" rule
_LETTER_RANGES = [(0x41, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF)]
# MiniSBD's decoder maps class 2 to "sentence ends after this character", 0 to "no boundary"
NO_BOUNDARY, SENTENCE_END = 0, 2
N_OUTPUT_CLASSES = 5  # MiniSBD (Stanza) tokenizer classes 0..4


def char_class(c: str) -> int:
    """The class of one character, as the ONNX vocabulary maps it."""
    if c == ".":
        return PERIOD
    if c in TERMINALS:
        return TERMINAL
    if c in CLOSERS:
        return CLOSER
    if c.isspace():
        return SPACE
    if "0" <= c <= "9":
        return DIGIT
    if any(lo <= ord(c) <= hi for lo, hi in _LETTER_RANGES):
        if c.islower():
            return LOWER
        if c.isupper():
            return UPPER
    return OTHER


def _vocab() -> dict[str, int]:
    unit2id = {name: i for i, name in enumerate(_CLASS_NAMES)}
    chars = [chr(i) for i in range(0x20, 0x500)] + list(TERMINALS) + list(CLOSERS) + ["\n", "\t", "\u00a0"]
    for c in chars:
        cls = char_class(c)
        if cls != OTHER:
            unit2id[c] = cls
    return unit2id


def sentence_ends(classes: list[int]) -> list[bool]:
    """For each character class, whether a sentence ends right after it (the rules the ONNX graph encodes).

    A sentence ends at a terminal (. ! ? ...) or at a closing quote right after one, when the text ends there
    or a space follows whose next character is not a lowercase letter. A period does not end a sentence
    after a digit (German ordinals: "am 3. Mai") or after a single letter ("z. B.", "A. Merkel").
    """
    n = len(classes)

    def at(i: int) -> int:
        return classes[i] if 0 <= i < n else PAD

    out = []
    for i in range(n):
        def terminal(j: int) -> bool:
            if at(j) == TERMINAL:
                return True
            if at(j) != PERIOD or at(j - 1) == DIGIT:
                return False
            single_letter = at(j - 1) in (LOWER, UPPER) and at(j - 2) in (SPACE, PAD)
            return not single_letter

        boundary_after = at(i + 1) == PAD or (at(i + 1) == SPACE and at(i + 2) != LOWER)
        end = boundary_after and (terminal(i) or (at(i) == CLOSER and terminal(i - 1)))
        out.append(end)
    return out


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences with the rules of `sentence_ends`; whitespace between sentences is dropped.

    Newlines are treated like spaces (Argos splits paragraphs on newlines before it splits sentences).
    """
    classes = [char_class(c) for c in text]
    # the ONNX path sees runs of whitespace collapsed to one space; do the same for the lookahead
    squeezed: list[int] = []
    index: list[int] = []
    for i, cls in enumerate(classes):
        if cls == SPACE and squeezed and squeezed[-1] == SPACE:
            continue
        squeezed.append(cls)
        index.append(i)
    ends = sentence_ends(squeezed)
    sentences, start = [], 0
    for k, end in enumerate(ends):
        if end:
            stop = index[k] + 1
            sentence = text[start:stop].strip()
            if sentence:
                sentences.append(sentence)
            start = stop
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def build_sbd_onnx(path: Path, lang: str) -> Path:
    """Write the rules of `sentence_ends` as a MiniSBD model: what Argos 1.11 runs from `<package>/minisbd/*.onnx`.

    The format (read from minisbd's `inference.py`): inputs `units` int64 [B, T] (vocabulary ids of the
    characters) and `features` float32 [B, T, F]; output 0 float [B, T, 5] whose argmax per character is the
    Stanza tokenizer class (2 = sentence ends here). Metadata props: `lang_code`, `config` (JSON: feat_funcs,
    max_seqlen, batch_size...), `vocab` (JSON state of a minisbd Vocab) and `lexicon` (JSON null).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(value, dtype) -> str:
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(kind: str, *inputs: str, **attrs) -> str:
        out = name(kind.lower())
        nodes.append(helper.make_node(kind, list(inputs), [out], **attrs))
        return out

    int_max = np.iinfo(np.int64).max

    def shifted(k: int) -> str:
        """units[:, i + k], PAD outside the text."""
        pad_value = const(PAD, np.int64)
        if k > 0:
            padded = op("Pad", "units", const([0, 0, 0, k], np.int64), pad_value)
            return op("Slice", padded, const([k], np.int64), const([int_max], np.int64), const([1], np.int64))
        padded = op("Pad", "units", const([0, -k, 0, 0], np.int64), pad_value)
        return op("Slice", padded, const([0], np.int64), const([k], np.int64), const([1], np.int64))

    u = {0: "units"}
    for k in (-3, -2, -1, 1, 2):
        u[k] = shifted(k)

    def eq(k: int, cls: int) -> str:
        return op("Equal", u[k], const(cls, np.int64))

    def any_of(*xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = op("Or", out, x)
        return out

    def all_of(*xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = op("And", out, x)
        return out

    def terminal(k: int) -> str:
        """The character at offset k ends a sentence if a boundary follows (k = 0 or -1)."""
        single_letter = all_of(any_of(eq(k - 1, LOWER), eq(k - 1, UPPER)), any_of(eq(k - 2, SPACE), eq(k - 2, PAD)))
        period_ok = all_of(eq(k, PERIOD), op("Not", eq(k - 1, DIGIT)), op("Not", single_letter))
        return any_of(eq(k, TERMINAL), period_ok)

    boundary_after = any_of(eq(1, PAD), all_of(eq(1, SPACE), op("Not", eq(2, LOWER))))
    end = all_of(boundary_after, any_of(terminal(0), all_of(eq(0, CLOSER), terminal(-1))))
    onehot_end = np.zeros(N_OUTPUT_CLASSES, np.float32)
    onehot_end[SENTENCE_END] = 1.0
    onehot_none = np.zeros(N_OUTPUT_CLASSES, np.float32)
    onehot_none[NO_BOUNDARY] = 1.0
    end3 = op("Unsqueeze", end, const([2], np.int64))
    scores = op("Where", end3, const(onehot_end, np.float32), const(onehot_none, np.float32))
    # `features` is part of MiniSBD's input contract; add 0 x its first column so the graph keeps the input
    feature0 = op("Slice", "features", const([0], np.int64), const([1], np.int64), const([2], np.int64))
    nodes.append(helper.make_node("Mul", [feature0, const(0.0, np.float32)], ["feature_zero"]))
    nodes.append(helper.make_node("Add", [scores, "feature_zero"], ["scores"]))

    graph = helper.make_graph(
        nodes, "newsclip_rule_sbd",
        [helper.make_tensor_value_info("units", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "time", "features"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "time", N_OUTPUT_CLASSES])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="newsclip")
    model.ir_version = 8  # readable by onnxruntime releases from 1.10 on
    unit2id = _vocab()
    id2unit = [None] * len(_CLASS_NAMES)
    for unit, i in unit2id.items():
        if unit in _CLASS_NAMES:
            id2unit[i] = unit
    config = {"feat_funcs": ["space_before"], "max_seqlen": 1_000_000, "batch_size": 32, "skip_newline": False,
              "no_ssplit": False, "use_dictionary": False, "num_dict_feat": 0}
    vocab = {"lang": lang, "idx": 0, "cutoff": 0, "lower": False, "_unit2id": unit2id, "_id2unit": id2unit}
    helper.set_model_props(model, {"lang_code": lang, "config": json.dumps(config), "vocab": json.dumps(vocab),
                                   "lexicon": "null", "newsclip_splitter": "rule-based v1"})
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path

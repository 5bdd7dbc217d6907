"""Which constrained-decoding library: llguidance, xgrammar and outlines-core side by side.

For each library: the time to compile a grammar against the tokenizer, and the time to compute the
mask of allowed tokens at each step of a real answer (a JSON document valid by the schema, fed token
by token as a model would write it), on a 128k vocabulary (Llama 3's size: SmolLM2's byte-level BPE
extended with merges of its own tokens to 128,256, so token lengths stay realistic); and which of a
set of JSON Schema features each one compiles (coverage).

    pip install xgrammar outlines-core   # not exoctl's dependencies: only for this comparison
    python benchmarks/constraint_masks.py [--vocab 128256] [--steps 200]

Prints one table per measure; record the machine (`lscpu`) with the numbers in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace, first programmer",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["mathematics", "analytical engine", "poetry"],
    "address": {"city": "London", "zip": "10001"},
    "role": "admin",
}

# one JSON Schema feature each, with a document the feature forbids: a library "enforces" it when
# its matcher refuses that document, "ignores" it when it compiles the schema and takes the document
# (the answer may then break the schema), "refuses" it when it will not compile the schema (a 400
# naming the feature, which is what a server should answer)
FEATURES: dict[str, tuple[dict[str, Any], Any]] = {
    "nested objects": (
        {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}},
        {"a": {"b": "x"}},
    ),
    "enum": ({"enum": ["x", "y", 3]}, "z"),
    "const": ({"const": "fixed"}, "other"),
    "anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 1.5),
    "oneOf": ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, True),
    "allOf": (
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
        {},
    ),
    "$ref / $defs": (
        {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}},
        {"a": "x"},
    ),
    "recursive $ref": (
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                }
            },
            "$ref": "#/$defs/node",
        },
        {"next": {"next": 3}},
    ),
    "string pattern": ({"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"}, "abc-x"),
    "string format: date-time": ({"type": "string", "format": "date-time"}, "yesterday"),
    "string format: email": ({"type": "string", "format": "email"}, "not an email"),
    "minLength / maxLength": ({"type": "string", "minLength": 2, "maxLength": 8}, "much too long here"),
    "integer minimum / maximum": ({"type": "integer", "minimum": -5, "maximum": 500}, 501),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0),
    "array minItems / maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        [1, 2, 3, 4],
    ),
    "prefixItems (tuples)": (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        ["a", "b"],
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"k": "x"},
    ),
    "patternProperties": ({"type": "object", "patternProperties": {"^x_": {"type": "string"}}}, {"x_a": 1}),
    "type arrays (nullable)": ({"type": ["string", "null"]}, 3),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 7),
}


def extended_tokenizer(size: int, folder: Path) -> Path:
    """SmolLM2's tokenizer.json with merges of its own tokens added until the vocabulary has `size`
    entries: a valid byte-level BPE whose new tokens are concatenations of real ones."""
    from tests.conftest import TEST_HOME
    from tests.smollm2_reference import reference_folder

    source = reference_folder(TEST_HOME / "reference")
    doc = json.loads((source / "tokenizer.json").read_text())
    model = doc["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    pieces = [t for t in vocab if len(t) >= 2 and t.isascii()]
    rng = random.Random(0)
    added = len(doc.get("added_tokens", []))
    while len(vocab) + added < size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        token = a + b
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        merges.append([a, b] if isinstance(merges[0], list) else f"{a} {b}")
    # added tokens (the specials) keep ids after the merged vocabulary
    for i, token in enumerate(doc.get("added_tokens", [])):
        token["id"] = len(vocab) + i
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (folder / name).write_text((source / name).read_text())
    return folder


def answer_tokens(hf: Any) -> list[int]:
    return list(hf.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False))


def time_steps(step: Callable[[int], None], tokens: list[int]) -> list[float]:
    """Microseconds of each mask computation, the token then consumed (not timed)."""
    times = []
    for token in tokens:
        began = time.perf_counter()
        step(token)
        times.append((time.perf_counter() - began) * 1e6)
    return times


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        failed, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar)
        if failed:
            raise ValueError("; ".join(messages))
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def run(self, matcher: Any, tokens: list[int]) -> list[float]:
        def step(token: int) -> None:
            matcher.compute_bitmask()
            if not matcher.consume_token(token):
                raise AssertionError(f"llguidance refused token {token} of the answer")

        return time_steps(step, tokens)

    def accepts(self, matcher: Any, tokens: list[int]) -> bool:
        return bool(
            matcher.validate_tokens(tokens) == len(tokens)
            and matcher.consume_tokens(tokens)
            and matcher.is_accepting()
        )


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        return self.xgr.GrammarMatcher(compiled)

    def run(self, matcher: Any, tokens: list[int]) -> list[float]:
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)

        def step(token: int) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            if not matcher.accept_token(token):
                raise AssertionError(f"xgrammar refused token {token} of the answer")

        return time_steps(step, tokens)

    def accepts(self, matcher: Any, tokens: list[int]) -> bool:
        return all(matcher.accept_token(t) for t in tokens) and matcher.is_completed()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf: Any, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.hf = hf
        self.vocabulary: Any = None

    def _vocabulary(self) -> Any:
        if self.vocabulary is None:
            # outlines-core's own builder reads a Hub repo; build its Vocabulary from the token bytes
            from exoctl.engine.tokenizer import piece_bytes

            eos = self.hf.eos_token_id
            mapping: dict[bytes, list[int]] = {}
            for piece, token in self.hf.get_vocab().items():
                if token == eos:
                    continue
                mapping.setdefault(piece_bytes(piece, True), []).append(token)
            self.vocabulary = self.oc.Vocabulary(eos, {k: v for k, v in mapping.items()})
        return self.vocabulary

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        index = self.oc.Index(regex, self._vocabulary())
        return self.oc.Guide(index)

    def run(self, guide: Any, tokens: list[int]) -> list[float]:
        def step(token: int) -> None:
            guide.get_tokens()
            guide.advance(token)

        return time_steps(step, tokens)

    def accepts(self, guide: Any, tokens: list[int]) -> bool:
        try:
            for token in tokens:
                guide.advance(token)
        except Exception:
            return False
        return bool(guide.is_finished() or self.hf.eos_token_id in guide.get_tokens())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        hf = AutoTokenizer.from_pretrained(str(extended_tokenizer(args.vocab, Path(tmp))))
    vocab = len(hf)
    tokens = answer_tokens(hf)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"vocabulary: {vocab} tokens; the answer: {len(tokens)} tokens\n")
    libraries: list[Any] = []
    for kind in (LLGuidance, XGrammar, OutlinesCore):
        began = time.perf_counter()
        try:
            libraries.append((kind(hf, vocab), time.perf_counter() - began))
        except ImportError as exc:
            print(f"{kind.name}: not installed ({exc})")
    print("| library | tokenizer setup | schema compile | mask per token: median | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for library, setup in libraries:
        try:
            began = time.perf_counter()
            matcher = library.compile(PERSON)
            compile_s = time.perf_counter() - began
            times = library.run(matcher, tokens)
            ordered = sorted(times)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            print(
                f"| {library.name} | {setup * 1000:.0f} ms | {compile_s * 1000:.1f} ms | "
                f"{statistics.median(times):.0f} µs | {p99:.0f} µs | {max(times):.0f} µs |"
            )
        except Exception as exc:  # a library that cannot take the schema says so in its row
            print(f"| {library.name} | {setup * 1000:.0f} ms | failed: {str(exc)[:80]} | | | |")
    print("\n| JSON Schema feature | " + " | ".join(lib.name for lib, _ in libraries) + " |")
    print("| --- |" + " :---: |" * len(libraries))
    enforced = {lib.name: 0 for lib, _ in libraries}
    ignored = {lib.name: 0 for lib, _ in libraries}
    for feature, (schema, wrong) in FEATURES.items():
        row = []
        bad = list(hf.encode(json.dumps(wrong, separators=(",", ":")), add_special_tokens=False))
        for library, _ in libraries:
            try:
                matcher = library.compile(schema)
            except Exception:
                row.append("refuses")
                continue
            if library.accepts(matcher, bad):
                row.append("**ignores**")
                ignored[library.name] += 1
            else:
                row.append("enforces")
                enforced[library.name] += 1
        print(f"| {feature} | " + " | ".join(row) + " |")
    totals = [f"{enforced[lib.name]} enforced, {ignored[lib.name]} ignored" for lib, _ in libraries]
    print(f"| **of {len(FEATURES)}** | " + " | ".join(totals) + " |")


if __name__ == "__main__":
    main()

"""The HTTP API's request bodies: checked, field by field, and turned into batch rows.

A mistake is a `RequestError` with the HTTP status to answer and the field it is about
(`inputs[2]`, `candidates[0][1]`), so a client sees which part of its request is wrong.
Text is tokenized as `infer` tokenizes it (`infer_rows.tokenize`): inputs longer than the
largest compiled input length are cut, EOS kept, and marked as truncated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import seqio

from softprompt_jax import gin_checks
from softprompt_jax.infer_rows import tokenize
from softprompt_jax.serving.engine import SCORE, Mode, Shapes, Work

PREDICT_FIELDS = ("prompt", "inputs", "max_decode_length", "temperature", "num_beams")
SCORE_FIELDS = ("prompt", "inputs", "candidates")
PROMPT_FIELDS = ("name", "path", "prompt")


class RequestError(Exception):
    """A request the server cannot answer: its HTTP status, a message, the field concerned."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict[str, Any]:
        return {"error": self.message} | ({} if self.field is None else {"field": self.field})


@dataclasses.dataclass(frozen=True)
class Rows:
    """A request's batch rows, which of its inputs were cut, and (to score) each input's
    candidates, whose pairs are the rows in order."""

    works: list[Work]
    truncated: list[bool]
    candidates: list[list[str]] | None = None


def json_object(raw: bytes, fields: Collection[str]) -> dict[str, Any]:
    """The body as a JSON object with only known `fields` (400 otherwise)."""
    try:
        body = json.loads(raw.decode())
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the body is not UTF-8 ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise RequestError(
            400,
            f"the body is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})",
        ) from error
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_described(body)}")
    for name in body:
        if name not in fields:
            hint = gin_checks.did_you_mean(name, fields)
            raise RequestError(
                400, f"unknown field {name!r}; the fields are {', '.join(fields)}{hint}", name
            )
    return body


class Parser:
    """Checks request bodies against the prompts and the compiled shapes; tokenizes them."""

    def __init__(
        self,
        inputs: seqio.Feature,
        targets: seqio.Feature,
        shapes: Shapes,
        max_rows: int,
    ) -> None:
        self.inputs, self.targets, self.shapes, self.max_rows = inputs, targets, shapes, max_rows

    def predict(self, raw: bytes, prompts: Collection[str]) -> Rows:
        """`{"prompt", "inputs", "max_decode_length"?, "temperature"?, "num_beams"?}`."""
        body = json_object(raw, PREDICT_FIELDS)
        prompt = _prompt(body, prompts)
        texts = self._inputs(body, len(_list(body, "inputs")))
        mode = self._mode(body)
        length = self.shapes.target_length
        decode_length = body.get("max_decode_length", length)
        if not _is_int(decode_length) or not 1 <= decode_length <= length:
            raise RequestError(
                400,
                f"max_decode_length must be an integer from 1 to {length}, got "
                f"{_described(decode_length)}",
                "max_decode_length",
            )
        if mode.num_beams > 1 and decode_length != length:
            raise RequestError(
                400,
                f"with num_beams > 1, max_decode_length must be {length} (beam search "
                "decodes the whole length)",
                "max_decode_length",
            )
        works, truncated = [], []
        for text in texts:
            tokens, cut = tokenize(text, self.inputs, self.shapes.max_input_length)
            works.append(Work(mode, prompt, tokens, decode_length=decode_length))
            truncated.append(cut)
        return Rows(works, truncated)

    def score(self, raw: bytes, prompts: Collection[str]) -> Rows:
        """`{"prompt", "inputs", "candidates"}`: a row for every input-candidate pair."""
        body = json_object(raw, SCORE_FIELDS)
        prompt = _prompt(body, prompts)
        candidates = _list(body, "candidates")
        texts = self._inputs(body, sum(len(c) if isinstance(c, list) else 1 for c in candidates))
        if len(candidates) != len(texts):
            raise RequestError(
                400,
                f"candidates must hold one list per input ({len(texts)}), got {len(candidates)}",
                "candidates",
            )
        works, truncated = [], []
        for i, (text, each) in enumerate(zip(texts, candidates, strict=True)):
            if not _strings(each):
                raise RequestError(
                    400,
                    f"must be a non-empty list of strings, got {_described(each)}",
                    f"candidates[{i}]",
                )
            tokens, cut = tokenize(text, self.inputs, self.shapes.max_input_length)
            truncated.append(cut)
            for j, candidate in enumerate(each):
                target, _ = tokenize(candidate, self.targets, None)
                if len(target) > self.shapes.target_length:
                    raise RequestError(
                        400,
                        f"the candidate has {len(target)} tokens (EOS included); the limit "
                        f"is {self.shapes.target_length} (TASK_FEATURE_LENGTHS['targets'])",
                        f"candidates[{i}][{j}]",
                    )
                works.append(Work(SCORE, prompt, tokens, target=target))
        return Rows(works, truncated, candidates)

    def _inputs(self, body: Mapping[str, Any], rows: int) -> list[str]:
        texts = _list(body, "inputs")
        if not texts:
            raise RequestError(400, "inputs must not be empty", "inputs")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(400, f"must be a string, got {_described(text)}", f"inputs[{i}]")
        if rows > self.max_rows:
            raise RequestError(
                413,
                f"the request has {rows} rows (inputs, or input-candidate pairs to score); the "
                f"limit is {self.max_rows} (SERVE_MAX_ROWS)",
                "inputs",
            )
        return texts

    def _mode(self, body: Mapping[str, Any]) -> Mode:
        temperature = body.get("temperature", 0.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise RequestError(
                400, f"must be a number, got {_described(temperature)}", "temperature"
            )
        beams = body.get("num_beams", 1)
        if not _is_int(beams):
            raise RequestError(400, f"must be an integer, got {_described(beams)}", "num_beams")
        mode = Mode(temperature=float(temperature), num_beams=beams)
        if mode not in self.shapes.decode_modes:
            served = ", ".join(
                f"temperature {m.temperature:g} with {m.num_beams} beam(s)"
                for m in self.shapes.decode_modes
            )
            field = "num_beams" if beams != 1 else "temperature"
            raise RequestError(
                400,
                f"this server decodes with {served} (SERVE_TEMPERATURES, SERVE_NUM_BEAMS); "
                f"got temperature {temperature:g} with {beams} beam(s)",
                field,
            )
        return mode


def prompt_update(raw: bytes) -> tuple[str, str | None, np.ndarray | None]:
    """`{"name", "path"}` or `{"name", "prompt": [[...], ...]}`: the name, and the file or
    the array (`[length, emb_dim]` numbers)."""
    body = json_object(raw, PROMPT_FIELDS)
    name = body.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise RequestError(
            400, f"must be a non-empty string without '/', got {_described(name)}", "name"
        )
    if ("path" in body) == ("prompt" in body):
        raise RequestError(400, "give one of path (a prompt file) and prompt (an array)", "path")
    if "path" in body:
        if not isinstance(body["path"], str):
            raise RequestError(400, f"must be a string, got {_described(body['path'])}", "path")
        return name, body["path"], None
    try:
        array = np.asarray(body["prompt"], np.float32)
    except (ValueError, TypeError) as error:
        raise RequestError(
            400, f"must be a [length, emb_dim] array of numbers ({error})", "prompt"
        ) from error
    if array.ndim != 2:
        raise RequestError(
            400, f"must be a [length, emb_dim] array, got shape {array.shape}", "prompt"
        )
    return name, None, array


def _prompt(body: Mapping[str, Any], prompts: Collection[str]) -> str:
    name = body.get("prompt")
    if not isinstance(name, str):
        got = "nothing" if "prompt" not in body else _described(name)
        raise RequestError(400, f"must be a prompt's name (a string), got {got}", "prompt")
    if name not in prompts:
        hint = gin_checks.did_you_mean(name, prompts)
        raise RequestError(
            404, f"no prompt named {name!r}; the server has {', '.join(prompts)}{hint}", "prompt"
        )
    return name


def _list(body: Mapping[str, Any], field: str) -> list[Any]:
    value = body.get(field)
    if not isinstance(value, list):
        got = "nothing" if field not in body else _described(value)
        raise RequestError(400, f"must be a list, got {got}", field)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _described(value: Any) -> str:
    """A JSON value as a message shows it: `5 (int)`."""
    return f"{json.dumps(value)[:40]} ({type(value).__name__})"

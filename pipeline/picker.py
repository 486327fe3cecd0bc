"""Face picking by description: which detected face a phrase such as "the woman on the left"
means, answered by a Qwen vision-language model (GGUF, llama-cpp-python with the mtmd vision
projector): Qwen2.5-VL-3B in the seed profile, Qwen2-VL-2B (Apache-2.0) in the commercial one
(`PickerModelSpec`, `FacePicker.load(layout, profile=...)`).

One picker serves both `face_description` (the reference photo) and `target_description` (the
generated scene). Every call shows the model ONE image: the scene with a numbered box around
each candidate face (`compose_sheet`), and a GBNF grammar lets it answer only one of the numbers
drawn. Labels are 1-based: label k marks `boxes[k - 1]`.

Never fatal: one face or no description makes no model call, and any failure (model not loaded,
timeout, unusable answer) falls back to the largest face with `picked_by` saying why. The
design and the sizes (image tokens, context, VRAM) are explained in docs/picker.md.

The model sees what it was trained on: `check_projector` refuses a projector llama.cpp would run
as another encoder than the profile's model's, and `PICKER_CHAT_FORMAT` ends the prompt with
`<|im_start|>assistant` and its newline, which the stock handler's template loses.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipeline import cancel
from pipeline.errors import Cancelled, NoFaceFound, PickerFailure, WeightsMissing, shorten
from pipeline.layout import Layout
from pipeline.picker_model import (  # noqa: F401  (re-exported: the picker's API)
    COMMERCIAL_PICKER,
    N_BATCH,
    N_CTX,
    PICKER_CHAT_FORMAT,
    PROJECTOR_TYPE,
    SEED_PICKER,
    SYSTEM_PROMPT,
    PickerModelSpec,
    chat_messages,
    check_projector,
    gguf_metadata,
    open_llama,
    picker_chat_handler,
    picker_model_spec,
)
from pipeline.profiles import SEED

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels

PATCH = 28  # Qwen2-VL and 2.5-VL: 14 px patches merged 2x2, so one image token per 28x28 px
MAX_SIDE = 672  # long side of the sheet: at most 24x24 = 576 image tokens
MIN_SIDE = 2 * PATCH
MAX_IMAGE_TOKENS = (MAX_SIDE // PATCH) ** 2
MAX_CANDIDATES = 16  # more faces than this: only the largest 16 get a number
MAX_DESCRIPTION_CHARS = 200
MAX_ANSWER_TOKENS = 4  # "16" is at most 2 tokens, then the end of turn
DEFAULT_TIMEOUT_S = 20.0
STOP_POLL_S = 0.05  # how often a waiting pick looks at its request's stop token
PALETTE = [(230, 25, 75), (0, 130, 200), (255, 225, 25), (60, 180, 75), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230)]


@dataclass(frozen=True)
class PickResult:
    """Which face was picked (an index into the boxes given) and why.

    picked_by: "only face", "largest" (no description), "description" (the model's answer), or
    "largest (picker failed: <reason>)".
    """

    index: int
    picked_by: str
    answer_raw: str | None
    seconds: float


@dataclass(frozen=True)
class Sheet:
    """The one image the model sees. `candidates[i]` is an index into the boxes given; it is
    drawn with label `candidates[i] + 1`, face box `face_boxes[i]` and number tag `tag_boxes[i]`
    (sheet pixels)."""

    image: Image.Image
    candidates: list[int]
    face_boxes: list[tuple[int, int, int, int]]
    tag_boxes: list[tuple[int, int, int, int]]

    @property
    def labels(self) -> list[int]:
        return [i + 1 for i in self.candidates]

    @property
    def image_tokens(self) -> int:
        """Vision tokens the model spends on the sheet (its sides are multiples of 28 px)."""
        return (self.image.width // PATCH) * (self.image.height // PATCH)


def box_area(box: Box) -> float:
    x1, y1, x2, y2 = box
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def largest_face(boxes: Sequence[Box]) -> int:
    """Index of the largest box by area (w*h); the first one on ties."""
    return max(range(len(boxes)), key=lambda i: (box_area(boxes[i]), -i))


def clean_description(description: str | None) -> str:
    """The description as it goes into the prompt: no chat-template or media markers (they are
    parsed as special tokens), no control characters, whitespace collapsed, capped in length."""
    text = re.sub(r"<\|[^|]*\|>|<__media__>|<\||\|>", " ", description or "")
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:MAX_DESCRIPTION_CHARS].strip()


def answer_grammar(labels: Sequence[int]) -> str:
    """GBNF allowing exactly one of the labels, written as decimal numbers."""
    if not labels:
        raise ValueError("`labels` must hold at least one label, got []")
    return "root ::= " + " | ".join(f'"{int(label)}"' for label in labels)


def _sheet_region(boxes: Sequence[Box], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of the photo shown: all candidate faces plus a margin of one face size to the
    sides and above and two below (hair, shoulders, clothes), so positions between the faces
    stay true while small faces in a large photo get more pixels."""
    unit = max(max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes)
    left = min(b[0] for b in boxes) - unit
    top = min(b[1] for b in boxes) - unit
    right = max(b[2] for b in boxes) + unit
    bottom = max(b[3] for b in boxes) + 2 * unit
    width, height = size
    box = (max(0, int(left)), max(0, int(top)),
           min(width, round(right)), min(height, round(bottom)))
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return (0, 0, width, height)
    return box


def _sheet_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Scale so the long side is `max_side`, then round both sides down to multiples of 28."""
    scale = max_side / max(width, height)

    def side(value: int) -> int:
        return max(MIN_SIDE, int(value * scale) // PATCH * PATCH)

    return side(width), side(height)


def compose_sheet(image: Image.Image, boxes: Sequence[Box], *,
                  max_side: int = MAX_SIDE) -> Sheet:
    """Crop the photo around the faces, scale it so its long side is `max_side` (sides multiples
    of 28 px, so at most (max_side / 28)^2 image tokens), and draw each candidate face's box
    with its number tag (label = index + 1) in one of 8 colours."""
    if max_side < MIN_SIDE:
        raise ValueError(f"`max_side` must be at least {MIN_SIDE} px, got {max_side}")
    if len(boxes) == 0:
        raise ValueError("`boxes` must hold at least one face box, got []")
    boxes = [(float(min(x1, x2)), float(min(y1, y2)), float(max(x1, x2)), float(max(y1, y2)))
             for x1, y1, x2, y2 in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (-box_area(boxes[i]), i))
    candidates = sorted(order[:MAX_CANDIDATES])
    region = _sheet_region([boxes[i] for i in candidates], image.size)
    width, height = _sheet_size(region[2] - region[0], region[3] - region[1], max_side)
    sheet = image.convert("RGB").crop(region).resize((width, height), Image.Resampling.BICUBIC)
    sx, sy = width / (region[2] - region[0]), height / (region[3] - region[1])

    draw = ImageDraw.Draw(sheet)
    line = max(2, round(max(width, height) / 224))
    font = ImageFont.load_default(size=min(40, max(14, round(max(width, height) / 22))))
    face_boxes: list[tuple[int, int, int, int]] = []
    for i in candidates:
        x1, y1, x2, y2 = boxes[i]
        face = (round((x1 - region[0]) * sx), round((y1 - region[1]) * sy),
                round((x2 - region[0]) * sx), round((y2 - region[1]) * sy))
        face_boxes.append(face)
        draw.rectangle(face, outline=PALETTE[i % len(PALETTE)], width=line)
    tag_boxes = [_draw_tag(draw, font, str(i + 1), face, PALETTE[i % len(PALETTE)], sheet.size)
                 for i, face in zip(candidates, face_boxes, strict=True)]
    return Sheet(sheet, candidates, face_boxes, tag_boxes)


def _draw_tag(draw: ImageDraw.ImageDraw, font: Any, text: str, face: tuple[int, int, int, int],
              colour: tuple[int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A filled tag with the number at the face box's top-left corner: above the box when
    there is room, else just inside it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0, face[0]), size[0] - tag_w)
    y = face[1] - tag_h if face[1] - tag_h >= 0 else max(0, face[1])
    y = min(y, size[1] - tag_h)
    tag = (x, y, x + tag_w, y + tag_h)
    draw.rectangle(tag, fill=colour)
    ink = (0, 0, 0) if sum(colour) > 400 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)
    return tag


def question(description: str, labels: Sequence[int]) -> str:
    numbers = ", ".join(str(label) for label in labels)
    return (f"This image shows {len(labels)} faces, each inside a coloured box with a number tag "
            f"({numbers}). Which number marks the face of: {description}? "
            "Answer with the number only.")


def parse_answer(answer: str, labels: Sequence[int]) -> int:
    """The label the model answered; PickerFailure when it is not one of the labels."""
    text = answer.strip()
    if not text:
        raise PickerFailure("empty answer")
    if not text.isdigit() or int(text) not in labels:
        raise PickerFailure(f"answer {shorten(text, 20)} is not one of the labels {list(labels)}")
    return int(text)


class FacePicker:
    """The picker stage around one resident model.

    Every model operation (load, reload, call) runs on one worker thread, so calls never
    overlap on the model. A call that passes `timeout_s` is abandoned: Python cannot stop the
    thread (llama.cpp's image encoding is one C call), so it runs to its end in the background;
    the model is marked stale and the next call, queued behind it on the same worker, first
    closes and reloads the model. If the abandoned call is still running after a further
    `timeout_s`, the next pick falls back at once ("busy").
    """

    def __init__(self, open_model: Callable[[], Any], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 temperature: float = 0.0, max_side: int = MAX_SIDE):
        self._open_model = open_model
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_side = max_side
        self.spec: PickerModelSpec | None = None  # which pair `load` opened (None: built here)
        self.error: str | None = None  # why the model is unusable, when it is
        self.loads = 0
        self.model_calls = 0
        self.load_seconds: float | None = None
        self._llm: Any = None
        self._stale = False
        self._lock = threading.Lock()
        self._inflight: Future[str] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="face-picker")

    @classmethod
    def load(cls, layout: Layout, *, profile: str = SEED, n_gpu_layers: int = -1,
             n_threads: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
             temperature: float = 0.0, max_side: int = MAX_SIDE,
             required: bool = False) -> FacePicker:
        """Load `profile`'s pair (`picker_model_spec`: "seed" or "commercial"; another raises
        ValueError) now and run one tiny image through it (which also sets up the vision
        projector and reserves its buffers). `required` (on a GPU host): a model or projector
        that does not load or warm up raises WeightsMissing naming both of the profile's files,
        so the worker never starts with every description silently falling back. Otherwise the
        picker answers every pick with the largest face and says why. The projector is checked
        before llama.cpp opens it (`check_projector`): a wrong one is such a failure, named
        with its file and the reason."""
        spec = picker_model_spec(profile)
        picker = cls(lambda: open_llama(layout, profile=spec.profile, n_gpu_layers=n_gpu_layers,
                                        n_threads=n_threads),
                     timeout_s=timeout_s, temperature=temperature, max_side=max_side)
        picker.spec = spec
        picker.warm_up()
        if required and picker.error is not None:
            picker.close()
            owner = "" if spec.profile == SEED else f"{spec.profile} profile's "
            raise WeightsMissing(
                f"{owner}face picker model {spec.model(layout)} with projector "
                f"{spec.mmproj(layout)} did not load or warm up: {picker.error}")
        return picker

    def warm_up(self) -> None:
        start = time.perf_counter()
        tiny = Image.new("RGB", (MIN_SIDE, MIN_SIDE), (128, 128, 128))
        try:
            self._worker.submit(self._call, tiny, "Say 1.", answer_grammar([1]), 0).result()
        except Exception as error:  # noqa: BLE001 - a bad model must not stop the worker
            if self.error is None:
                self.error = f"warm-up failed: {type(error).__name__}: {error}"
                self._worker.submit(self._drop_model).result()
            log.warning("face picker unusable, picks fall back to the largest face: %s",
                        self.error)
        self.load_seconds = time.perf_counter() - start
        log.info("face picker ready in %.2f s (error: %s)", self.load_seconds, self.error)

    def pick(self, image: Image.Image, boxes: Sequence[Box], description: str | None, *,
             seed: int | None = None, field: str = "image_url") -> PickResult:
        """Index of the face in `boxes` (x1, y1, x2, y2, in the order the response reports)
        that `description` means. Raises only NoFaceFound (`field` names the image) for no
        boxes; every other problem falls back to the largest face."""
        start = time.perf_counter()
        if len(boxes) == 0:
            raise NoFaceFound(field)
        largest = largest_face(boxes)
        text = clean_description(description)
        if len(boxes) == 1:
            return PickResult(0, "only face", None, time.perf_counter() - start)
        if not text:
            return PickResult(largest, "largest", None, time.perf_counter() - start)
        answer: str | None = None
        try:
            sheet = compose_sheet(image, boxes, max_side=self.max_side)
            answer = self._ask(sheet, question(text, sheet.labels), answer_grammar(sheet.labels),
                               seed)
            label = parse_answer(answer, sheet.labels)
        except Cancelled:
            raise  # the request was stopped: no fallback, the request ends
        except Exception as error:  # noqa: BLE001 - the picker must never fail a request
            reason = str(error) if isinstance(error, PickerFailure) else (
                f"{type(error).__name__}: {error}")
            log.warning("face picker fell back to the largest face: %s", reason)
            if len(reason) > 160:
                reason = reason[:157] + "..."
            return PickResult(largest, f"largest (picker failed: {reason})", answer,
                              time.perf_counter() - start)
        log.info("face picker: %r -> label %d of %s (%d image tokens)", text, label,
                 sheet.labels, sheet.image_tokens)
        return PickResult(label - 1, "description", answer, time.perf_counter() - start)

    def _ask(self, sheet: Sheet, prompt: str, grammar: str, seed: int | None) -> str:
        if not self._lock.acquire(timeout=self.timeout_s):
            raise PickerFailure(f"busy: another pick held the model for {self.timeout_s:g} s")
        try:
            if self._inflight is not None and not self._inflight.done():
                wait_futures([self._inflight], timeout=self.timeout_s)
                if not self._inflight.done():
                    raise PickerFailure("busy: a timed-out call is still running")
            future = self._worker.submit(self._call, sheet.image, prompt, grammar, seed)
            self._inflight = future
            self.model_calls += 1
            return self._result(future)
        finally:
            self._lock.release()

    def _result(self, future: Future[str]) -> str:
        """The call's answer, waited for in short slices so a stopped request
        (`pipeline.cancel`) ends at once: the call itself runs to its end on the worker (one C
        call cannot be interrupted), its answer unused, and the model stays usable (a stop is
        no timeout: nothing is reloaded); the next pick queues behind it on the worker."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                answer = future.result(timeout=max(0.0, min(STOP_POLL_S,
                                                            deadline - time.monotonic())))
            except FutureTimeout:
                cancel.check("face picker")
                if time.monotonic() >= deadline:
                    self._stale = True  # reloaded by the worker before its next call
                    raise PickerFailure(f"timed out after {self.timeout_s:g} s") from None
                continue
            cancel.check("face picker")  # a stop that came during the call stops here too
            return answer

    def _model(self) -> Any:
        """The loaded model (worker thread only): reloaded after a timed-out call, never
        retried after a load error."""
        if self._stale and self._llm is not None:
            log.warning("face picker: reloading the model after a timed-out call")
            self._drop_model()
        self._stale = False
        if self._llm is None:
            if self.error is not None:
                raise PickerFailure(self.error)
            try:
                self._llm = self._open_model()
            except Exception as error:
                self.error = f"model load error: {type(error).__name__}: {error}"
                raise PickerFailure(self.error) from error
            self.loads += 1
        return self._llm

    def _drop_model(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _call(self, image: Image.Image, prompt: str, grammar: str, seed: int | None) -> str:
        from llama_cpp import LlamaGrammar

        llm = self._model()
        response = llm.create_chat_completion(
            messages=chat_messages(image, prompt),
            grammar=LlamaGrammar.from_string(grammar, verbose=False),
            temperature=self.temperature, seed=seed, max_tokens=MAX_ANSWER_TOKENS)
        return response["choices"][0]["message"]["content"] or ""

    def close(self) -> None:
        """Stop the worker (after any running call) and free the model."""
        self._worker.shutdown(wait=True)
        self._drop_model()

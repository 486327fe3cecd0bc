"""Typed errors of the core; the adapters (Cog, RunPod) map them to their own failure forms.

Every message names the field (or file) at fault, the rule and the value, in the style of
diffusers' ``check_inputs``: "`steps` must be at most 100, got 500".
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class InvalidInput(PipelineError, ValueError):
    """A request field breaks a rule of the request schema."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"`{field}` {message}")


class ImageInputError(InvalidInput):
    """The reference image could not be fetched, decoded or accepted."""


class NoFaceFound(InvalidInput):
    """The reference image holds no detectable face."""

    def __init__(self, field: str):
        super().__init__(field, f"holds no detectable face: no face found in {field}")


class FaceSwapNotApplied(PipelineError):
    """The swap could not be applied and the request asked for it to be required."""


class Cancelled(PipelineError):
    """The request was stopped (cancel, execution timeout, `PIPELINE_JOB_TIMEOUT_S`) and ended
    at the next check (`pipeline.cancel`); shared model state was restored on the way out."""

    def __init__(self, reason: str, *, where: str = "", steps: int = 0,
                 steps_after_stop: int = 0):
        self.reason, self.where = reason, where
        self.steps, self.steps_after_stop = steps, steps_after_stop
        at = f" during {where}" if where else ""
        super().__init__(f"stopped{at}: {reason} ({steps} sampler steps ran, "
                         f"{steps_after_stop} after the stop)")


class WorkerUntrusted(PipelineError):
    """A restore of shared model state was cut short (`pipeline.shared_state`): this worker's
    output could differ from a fresh one's, so it refuses requests until it is replaced."""


class WeightsMissing(PipelineError):
    """Model files are absent, truncated or do not match the lock."""


class LockFormatError(PipelineError, ValueError):
    """`weights.lock` breaks its format; the message names the key, the rule and the value."""


class FetchError(PipelineError):
    """One download attempt failed; `retry` says whether trying the same source again helps."""

    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


class PickerFailure(PipelineError, RuntimeError):
    """Why the face picker's model could not answer; `pick` turns it into a largest-face
    fallback, so it never leaves `pipeline.picker`."""


class ProviderUnavailable(PipelineError):
    """A model meant for the GPU would run elsewhere (a runtime's GPU provider did not start)."""


class SettingsError(PipelineError, ValueError):
    """An environment setting is invalid; names the variable, the rule and the value."""


class OutputTooLarge(InvalidInput):
    """The encoded response would exceed the transport's size limit."""


class UploadFailed(PipelineError):
    """An image could not be put in the bucket (`output.upload`) after every try."""


class GraphsCompiledAfterWarmUp(PipelineError):
    """With torch.compile on, a request compiled a graph the warm-up did not build (raised in
    strict mode, the tests; production logs a warning, `pipeline.compiled.CompileWatch`)."""


def shorten(value: object, limit: int = 80) -> str:
    """repr() of a value, cut to ``limit`` characters so error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

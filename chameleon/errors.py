"""Typed errors. Every failure a user can cause maps to one of these; none of them stops the engine."""

from __future__ import annotations


class ChameleonError(Exception):
    """Base class of every error Chameleon raises on purpose."""


# --- configuration and requests -------------------------------------------------------------


class ConfigError(ChameleonError, ValueError):
    """An `EngineConfig` value is invalid."""


class InvalidSamplingParamsError(ChameleonError, ValueError):
    """A `SamplingParams` field is out of range or of the wrong type."""


class InvalidRequestError(ChameleonError, ValueError):
    """A request is malformed (empty prompt, token id out of vocabulary, duplicate id, ...)."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus `max_tokens` cannot fit in `max_model_len`, or the KV cache could never hold it."""


class RequestMemoryError(PromptTooLongError):
    """The request's KV at its longest (prompt + `max_tokens`), next to its adapter's rows and the
    pinned adapters', can never fit in the memory budget: it would wait forever, so it is refused."""


class ChatTemplateError(InvalidRequestError):
    """Chat messages cannot be rendered: no tokenizer, no chat template, or the template failed."""


class EngineClosedError(ChameleonError, RuntimeError):
    """A request reached an engine that is closed or not started."""


class EngineStepError(ChameleonError, RuntimeError):
    """An iteration failed; the requests in that batch were aborted, the engine keeps serving."""


class EngineOverloadedError(ChameleonError, RuntimeError):
    """The engine already holds `EngineConfig.max_queued_requests` unfinished requests; retry later."""


class SamplingError(ChameleonError, RuntimeError):
    """Some rows of a batch could not be sampled (non-finite logits or probabilities).

    `rows` are the failed row indices; `tokens` has one entry per row: the sampled id, or None for a
    failed row. Only the requests of the failed rows should fail; the others' tokens are valid.
    """

    def __init__(self, message: str, rows: tuple[int, ...], tokens: tuple[int | None, ...]) -> None:
        super().__init__(message)
        self.rows = rows
        self.tokens = tokens


# --- models -------------------------------------------------------------------------------


class ModelLoadError(ChameleonError):
    """A model directory is missing files or its weights do not match its config."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture or a feature of its config is not supported."""


# --- adapters -----------------------------------------------------------------------------


class AdapterError(ChameleonError):
    """Base class of adapter errors."""


class AdapterNotFoundError(AdapterError, KeyError):
    """No adapter with that name is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExistsError(AdapterError):
    """An adapter with that name is already registered."""


class AdapterLoadError(AdapterError):
    """An adapter directory cannot be read (missing files, unreadable safetensors, bad JSON)."""


class UnsafeAdapterFormatError(AdapterLoadError):
    """The adapter is only available in a pickle-based format; we never unpickle."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature we do not serve (DoRA, embedding LoRA, modules_to_save, ...)."""


class AdapterValidationError(AdapterError):
    """The adapter does not fit the base model (shapes, rank limit, unknown modules, dtype)."""


class UnsafeAdapterPatternError(AdapterValidationError):
    """A regex in the adapter config (target_modules, exclude_modules, rank/alpha_pattern key,
    layers_pattern) is too long or too complex to match in bounded time, or its match timed out."""


class AdapterQuarantinedError(AdapterError):
    """The adapter failed to load (its files vanished or changed); its requests are refused until it is
    removed and added again."""


class AdapterInUseError(AdapterError):
    """The adapter cannot be removed while requests use it."""


class AdapterMemoryError(AdapterError):
    """The adapter cannot fit in device memory even with every idle adapter evicted."""

"""vllmclient: a fast, hard-to-break client for vLLM's OpenAI-compatible server.

``from vllmclient import ClientvLLM`` is a drop-in for ``distilabel.models.llms.ClientvLLM``.
"""

from ._stream import StreamEnd, StreamEvent, TextDelta
from .client import ClientvLLM
from .errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConnectionLostError,
    GenerationFailedError,
    InvalidInputError,
    LocalServerError,
    ModelNotFoundError,
    PromptTooLongError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    UnknownFieldWarning,
    VLLMClientError,
)
from .formatter import ChatFormatter
from .jobs import JobSummary, run_batch_file
from .local_server import LocalServer
from .params import GenerationParams
from .results import GenerateOutput, GenerationError

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ChatFormatter",
    "ClientvLLM",
    "ConfigurationError",
    "ConnectionLostError",
    "GenerateOutput",
    "GenerationError",
    "GenerationFailedError",
    "GenerationParams",
    "InvalidInputError",
    "JobSummary",
    "LocalServer",
    "LocalServerError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnreachableError",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "UnknownFieldWarning",
    "VLLMClientError",
    "__version__",
    "run_batch_file",
]

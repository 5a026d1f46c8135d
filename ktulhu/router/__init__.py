"""Intent router: classifies each message and picks the system prompt for it (see docs/router.md).

The WebSocket layer needs three names:

- `Router.classify(text, language) -> IntentRoutingResult` (async; `runtime.router` provides the
  process's router while the router service runs);
- `IntentRoutingResult.to_json()` for the `classifier_debug` frame, `.message_meta()` for storage;
- `ktulhu.prompts.system_prompt(result, language)` for the rendered system prompt.

Importing this package loads neither onnxruntime nor the chat engine; `IntentModel.load` imports
onnxruntime and tokenizers when a model is loaded.
"""

from .labels import HEADS, Head, HeadSet
from .model import IntentModel, RouterLoadError
from .result import IntentRoutingResult, default_result
from .routing import normalise_language, route_intent
from .service import Router, RouterStatistics

__all__ = [
    "HEADS",
    "Head",
    "HeadSet",
    "IntentModel",
    "IntentRoutingResult",
    "Router",
    "RouterLoadError",
    "RouterStatistics",
    "default_result",
    "normalise_language",
    "route_intent",
]

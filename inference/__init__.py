"""dbloom inference: the engine interface, the MLX engine, models and `/dbloom/infer`.

Everything public is re-exported here; the modules are private.
"""

from ._cli import models_app as models_app
from ._engine import Engine as Engine
from ._engine import EngineLoad as EngineLoad
from ._engine import Generation as Generation
from ._engine import ModelInfo as ModelInfo
from ._errors import EngineBusy as EngineBusy
from ._errors import EngineClosed as EngineClosed
from ._errors import EngineError as EngineError
from ._errors import EngineFailure as EngineFailure
from ._errors import ErrorCode as ErrorCode
from ._errors import InsufficientMemory as InsufficientMemory
from ._errors import InvalidRequest as InvalidRequest
from ._errors import ModelError as ModelError
from ._errors import ModelNotFound as ModelNotFound
from ._errors import ProtocolFailure as ProtocolFailure
from ._errors import RequestTimeout as RequestTimeout
from ._errors import SlowConsumer as SlowConsumer
from ._errors import UnknownModel as UnknownModel
from ._errors import error_for_code as error_for_code
from ._events import Chunk as Chunk
from ._events import Final as Final
from ._events import FinishReason as FinishReason
from ._events import TokenLogprob as TokenLogprob
from ._mlx_engine import MLXEngine as MLXEngine
from ._models import LocalModel as LocalModel
from ._models import available_memory as available_memory
from ._models import cached_models as cached_models
from ._models import check_memory as check_memory
from ._models import inspect_model as inspect_model
from ._models import load_model as load_model
from ._models import model_digest as model_digest
from ._models import resolve_model as resolve_model
from ._protocol import CLIENT_CLOSED as CLIENT_CLOSED
from ._protocol import DEFAULT_MAX_CHUNK as DEFAULT_MAX_CHUNK
from ._protocol import DEFAULT_MAX_REQUEST as DEFAULT_MAX_REQUEST
from ._protocol import NEED_DATA as NEED_DATA
from ._protocol import PROTOCOL_ID as PROTOCOL_ID
from ._protocol import DecodeError as DecodeError
from ._protocol import ErrorMessage as ErrorMessage
from ._protocol import InferClient as InferClient
from ._protocol import InferServer as InferServer
from ._protocol import LocalProtocolError as LocalProtocolError
from ._protocol import decode_payload as decode_payload
from ._protocol import encode_message as encode_message
from ._request import ChatMessage as ChatMessage
from ._request import GenerateRequest as GenerateRequest
from ._service import infer as infer
from ._service import serve_infer as serve_infer
from ._tiny import build_tiny_model as build_tiny_model

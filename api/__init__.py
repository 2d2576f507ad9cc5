"""The OpenAI-compatible HTTP shim (issue 6), with Anthropic's Messages API and model aliases.

Everything public is re-exported here; the modules are private.
"""

from ._aliases import AliasEngine as AliasEngine
from ._aliases import parse_aliases as parse_aliases
from ._app import create_app as create_app
from ._errors import ApiError as ApiError
from ._errors import InsecureBind as InsecureBind
from ._errors import KeyStoreError as KeyStoreError
from ._errors import NoNodeAvailable as NoNodeAvailable
from ._keys import KEYS_FILE_NAME as KEYS_FILE_NAME
from ._keys import ApiKeyInfo as ApiKeyInfo
from ._keys import ApiKeys as ApiKeys
from ._keys import keys_app as keys_app
from ._server import check_bind as check_bind
from ._server import is_loopback as is_loopback
from ._server import serve_api as serve_api

"""Yamux stream multiplexing: a sans-IO core (`YamuxSession`) and its trio shell.

Most code wants `YamuxConnection` and `YamuxStream`; the core and its events are
public for tests, simulators and other shells.
"""

from ._core import DEFAULT_CONFIG as DEFAULT_CONFIG
from ._core import DEFAULT_MAX_ACK_BACKLOG as DEFAULT_MAX_ACK_BACKLOG
from ._core import DEFAULT_MAX_FRAME_DATA as DEFAULT_MAX_FRAME_DATA
from ._core import DEFAULT_MAX_SEND_FRAME as DEFAULT_MAX_SEND_FRAME
from ._core import DEFAULT_MAX_STREAMS as DEFAULT_MAX_STREAMS
from ._core import DEFAULT_WINDOW_SIZE as DEFAULT_WINDOW_SIZE
from ._core import INITIAL_WINDOW as INITIAL_WINDOW
from ._core import PROTOCOL_ID as PROTOCOL_ID
from ._core import DataReceived as DataReceived
from ._core import Event as Event
from ._core import FlowControlError as FlowControlError
from ._core import GoAwayReceived as GoAwayReceived
from ._core import Pong as Pong
from ._core import Role as Role
from ._core import SendWindowOpened as SendWindowOpened
from ._core import StreamEnded as StreamEnded
from ._core import StreamOpened as StreamOpened
from ._core import StreamReset as StreamReset
from ._core import StreamState as StreamState
from ._core import YamuxConfig as YamuxConfig
from ._core import YamuxSession as YamuxSession
from ._trio import DEFAULT_ACCEPT_BACKLOG as DEFAULT_ACCEPT_BACKLOG
from ._trio import DEFAULT_WRITE_TIMEOUT as DEFAULT_WRITE_TIMEOUT
from ._trio import YamuxConnection as YamuxConnection
from ._trio import YamuxStream as YamuxStream

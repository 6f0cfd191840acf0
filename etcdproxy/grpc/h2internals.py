"""The parts of h2's internals that `etcdproxy.grpc.h2fast` relies on, and the
check that the installed h2 has them as they were written against: its
connection states where sending and receiving change nothing, its stream
transitions (and a lookup of them cheaper than h2's own), its PING events, the
private names the fast path uses. `supported()` is False on any other h2, and
the fast path then stays off.
"""

import h2
from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.events import PingAckReceived, PingReceived, WindowUpdated
from h2.exceptions import FlowControlError, ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamInputs, StreamState, _transitions as _stream_transitions
from h2.windows import WindowManager

from etcdproxy.grpc.h2connection import BoundedH2Connection, _RECEIVE_FRAME_AS_EXPECTED

# The h2 releases the fast path was proven equivalent on (Debian bookworm's 4.1
# up to the newest 4.x); requirements.txt pins h2 to them.
TESTED_H2 = ("4.1.", "4.2.", "4.3.", "4.4.")


def quiet_states(*connection_inputs):
    """The connection states in which h2 takes each of these inputs without a
    transition or an event (its connection state machine changes nothing)."""
    table = H2ConnectionStateMachine._transitions
    return tuple(state for state in ConnectionState
                 if all(table.get((state, i)) == (None, state) for i in connection_inputs))


# Where HEADERS and DATA are sent, received, PINGs answered, windows opened quietly.
QUIET_CONNECTION_STATES = quiet_states(ConnectionInputs.SEND_DATA, ConnectionInputs.SEND_HEADERS)
QUIET_RECEIVING_STATES = quiet_states(ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_DATA)
QUIET_PING_STATES = quiet_states(ConnectionInputs.RECV_PING)
QUIET_WINDOW_STATES = quiet_states(ConnectionInputs.SEND_WINDOW_UPDATE)
QUIET_WINDOW_RECEIVING_STATES = quiet_states(ConnectionInputs.RECV_WINDOW_UPDATE)


# h2's stream transitions, keyed by the two enums' integer values: h2's own
# process_input looks them up by an (enum, enum) tuple, whose hashing runs two
# calls of Python code (Enum.__hash__) per transition, a dozen a proxied call.
_TRANSITIONS = {(state.value, input_.value): entry for (state, input_), entry in _stream_transitions.items()}


def step(machine, input_):
    """h2's ``H2StreamStateMachine.process_input(input_)``: the same transition
    function and target state, and the same handling of its errors."""
    previous = machine.state
    entry = _TRANSITIONS.get((previous._value_, input_._value_))
    if entry is None:
        return machine.process_input(input_)  # h2's refusal
    func, target = entry
    machine.state = target
    if func is None:
        return []
    try:
        return func(machine, previous)
    except ProtocolError:
        machine.state = StreamState.CLOSED
        raise
    except AssertionError as e:
        machine.state = StreamState.CLOSED
        raise ProtocolError(e) from e


# h2 keeps each setting as a deque of its values, the one in force first (None
# while a received setting is not in force yet); its properties read one
# through two or three Python calls. MAX_CONCURRENT_STREAMS has no default
# there: unset, h2 reads it as this.
UNSET_MAX_CONCURRENT_STREAMS = Settings().max_concurrent_streams


def settings_as_expected():
    """Whether h2's settings keep their values as the fast path reads them."""
    probe = Settings(client=False)
    store = getattr(probe, "_settings", None)
    if not isinstance(store, dict) or SettingCodes.MAX_CONCURRENT_STREAMS in store:
        return False
    probe.initial_window_size = 1000  # announced, not acknowledged
    entry = store.get(SettingCodes.INITIAL_WINDOW_SIZE)
    if entry is None or entry[0] != 65535 or probe.initial_window_size != 65535:
        return False
    probe.acknowledge()
    probe.max_concurrent_streams = 7
    probe.acknowledge()
    return (store[SettingCodes.INITIAL_WINDOW_SIZE][0] == probe.initial_window_size == 1000
            and store[SettingCodes.MAX_CONCURRENT_STREAMS][0] == probe.max_concurrent_streams == 7)


# Transitions the fast path takes by calling h2's own transition function,
# without `step`, where the stream's state is known and the function cannot
# fail (it makes the event, or notes how the stream closed): state -> (h2's
# function or None, the state after).
_S, _I = StreamState, StreamInputs
END_RECEIVED = {state: _stream_transitions.get((state, _I.RECV_END_STREAM))
                for state in (_S.OPEN, _S.HALF_CLOSED_LOCAL)}
END_SENT = {state: _stream_transitions.get((state, _I.SEND_END_STREAM))
            for state in (_S.OPEN, _S.HALF_CLOSED_REMOTE)}
# DATA on an open stream whose headers came (the function fails only before them).
DATA_RECEIVED = (_stream_transitions.get((_S.OPEN, _I.RECV_DATA)) or (None, None))[0]
# Header blocks, where h2's function fails only on what the caller checks first:
# received, a request on a new stream, a response on a client's stream (trailers
# after either); sent, a request on a new stream, a response on a server's stream
# (trailers after either).
HEADERS_RECEIVED = {state: _stream_transitions.get((state, _I.RECV_HEADERS))
                    for state in (_S.IDLE, _S.OPEN, _S.HALF_CLOSED_LOCAL)}
HEADERS_SENT = {state: _stream_transitions.get((state, _I.SEND_HEADERS))
                for state in (_S.IDLE, _S.OPEN, _S.HALF_CLOSED_REMOTE)}


def _direct_transitions_as_expected():
    def named(entry, name, target):
        func = entry and entry[0]
        return entry is not None and entry[1] is target and getattr(func, "__name__", None) == name
    return (named(END_RECEIVED[_S.OPEN], "stream_half_closed", _S.HALF_CLOSED_REMOTE)
            and named(END_RECEIVED[_S.HALF_CLOSED_LOCAL], "stream_ended", _S.CLOSED)
            and END_SENT[_S.OPEN] == (None, _S.HALF_CLOSED_LOCAL)
            and named(END_SENT[_S.HALF_CLOSED_REMOTE], "send_end_stream", _S.CLOSED)
            and _stream_transitions.get((_S.OPEN, _I.RECV_DATA)) == (DATA_RECEIVED, _S.OPEN)
            and _stream_transitions.get((_S.HALF_CLOSED_LOCAL, _I.RECV_DATA)) == (DATA_RECEIVED, _S.HALF_CLOSED_LOCAL)
            and getattr(DATA_RECEIVED, "__name__", None) == "data_received"
            and named(HEADERS_RECEIVED[_S.IDLE], "request_received", _S.OPEN)
            and named(HEADERS_RECEIVED[_S.OPEN], "response_received", _S.OPEN)
            and named(HEADERS_RECEIVED[_S.HALF_CLOSED_LOCAL], "response_received", _S.HALF_CLOSED_LOCAL)
            and named(HEADERS_SENT[_S.IDLE], "request_sent", _S.OPEN)
            and named(HEADERS_SENT[_S.OPEN], "response_sent", _S.OPEN)
            and named(HEADERS_SENT[_S.HALF_CLOSED_REMOTE], "response_sent", _S.HALF_CLOSED_REMOTE))


def event_maker(cls, *fields):
    """A function making h2's ``cls`` event from values of its ``fields``: h2
    4.3 and later build events with keywords, earlier h2 without arguments."""
    try:
        cls(**{name: 0 for name in fields})
    except TypeError:
        def make(*values):
            event = cls()
            for name, value in zip(fields, values):
                setattr(event, name, value)
            return event
        return make
    return lambda *values: cls(**dict(zip(fields, values)))


ping_received = event_maker(PingReceived, "ping_data")
ping_ack_received = event_maker(PingAckReceived, "ping_data")
window_updated = event_maker(WindowUpdated, "stream_id", "delta")


def h2_internals_as_expected():
    """Whether the h2 internals the fast path relies on are those it was written
    against: the state transitions it skips, and the names it uses."""
    S, I = StreamState, StreamInputs
    for key, target in (((S.OPEN, I.SEND_DATA), S.OPEN),
                        ((S.HALF_CLOSED_REMOTE, I.SEND_DATA), S.HALF_CLOSED_REMOTE)):
        if _stream_transitions.get(key) != (None, target):
            return False
    if len(QUIET_CONNECTION_STATES) != 2 or len(QUIET_RECEIVING_STATES) != 2:
        return False  # h2 4.x: CLIENT_OPEN and SERVER_OPEN, for both
    if not (set(QUIET_RECEIVING_STATES) <= set(QUIET_PING_STATES)
            and set(QUIET_RECEIVING_STATES) <= set(QUIET_WINDOW_STATES)
            and set(QUIET_RECEIVING_STATES) <= set(QUIET_WINDOW_RECEIVING_STATES)):
        return False
    # What receiving a header block or data does to a stream (H2Stream.receive_headers,
    # receive_data) in the states the lean path takes: an event from these handlers.
    for key, target in (((S.IDLE, I.RECV_HEADERS), S.OPEN),
                        ((S.OPEN, I.RECV_HEADERS), S.OPEN),
                        ((S.HALF_CLOSED_LOCAL, I.RECV_HEADERS), S.HALF_CLOSED_LOCAL),
                        ((S.OPEN, I.RECV_DATA), S.OPEN),
                        ((S.HALF_CLOSED_LOCAL, I.RECV_DATA), S.HALF_CLOSED_LOCAL),
                        ((S.OPEN, I.RECV_END_STREAM), S.HALF_CLOSED_REMOTE),
                        ((S.HALF_CLOSED_LOCAL, I.RECV_END_STREAM), S.CLOSED)):
        entry = _stream_transitions.get(key)
        if entry is None or entry[1] != target:
            return False
    probe = BoundedH2Connection(H2Configuration(client_side=True), 16384)
    # h2's data_to_send() for all of it: its output buffer as bytes, then a new one
    probe._data_to_send += b"x"
    if probe.data_to_send() != b"x" or probe._data_to_send != bytearray():
        return False
    buffer = probe.incoming_buffer
    stream = probe._get_or_create_stream(1, AllowedStreamIDs.ODD)
    return (isinstance(getattr(probe, "_frame_dispatch_table", None), dict)
            and isinstance(getattr(probe, "_data_to_send", None), bytearray)
            and all(hasattr(probe, name) for name in (
                "_receive_data_frame", "_receive_headers_frame", "_receive_window_update_frame",
                "_receive_ping_frame", "_begin_new_stream", "open_inbound_streams",
                "_inbound_flow_control_window_manager", "_prepare_for_sending", "MAX_WINDOW_INCREMENT",
                "data_to_send", "clear_outbound_data_buffer",
                "_terminate_connection", "_get_or_create_stream", "open_outbound_streams"))
            and all(hasattr(buffer, name) for name in ("_preamble_len", "_headers_buffer"))
            and all(hasattr(stream, name) for name in (
                "_expected_content_length", "_actual_content_length", "_track_content_length",
                "_inbound_window_manager", "request_method"))
            and window_manager_as_expected() and _direct_transitions_as_expected()
            and all(type(getattr(member, "_value_", None)) is int for member in (*StreamState, *StreamInputs))
            and all(hasattr(stream.state_machine, name) for name in ("headers_received", "state")))


def _streams_note_max_inbound_frame_size():
    """Whether h2 gives a new stream the connection's max_inbound_frame_size
    (h2 4.1 does, though it reads it nowhere; later h2 does not)."""
    probe = BoundedH2Connection(H2Configuration(client_side=True), 16384)
    return hasattr(probe._get_or_create_stream(1, AllowedStreamIDs.ODD), "max_inbound_frame_size")


STREAMS_NOTE_MAX_INBOUND_FRAME_SIZE = _streams_note_max_inbound_frame_size()


def window_manager_as_expected():
    """Whether h2's WindowManager consumes a window as the fast path does
    inline: ``current_window_size`` less the size, an error below 0."""
    manager = WindowManager(100)
    manager.window_consumed(60)
    if manager.current_window_size != 40:
        return False
    try:
        manager.window_consumed(41)
    except FlowControlError:
        return manager.current_window_size == -1
    return False


def supported():
    """Whether the installed h2 is one the fast path runs on."""
    return (h2.__version__.startswith(TESTED_H2) and _RECEIVE_FRAME_AS_EXPECTED
            and h2_internals_as_expected() and settings_as_expected())


SUPPORTED = supported()

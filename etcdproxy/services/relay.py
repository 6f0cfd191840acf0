"""Opening the upstream side of a client's call."""


def open_upstream(monitor, call, listener, avoid=()):
    """Starts ``call``'s method upstream, on the endpoint ``monitor`` picks
    (avoiding the channels in ``avoid`` when it can), reporting to ``listener``,
    with flow control linking the two sides.

    Returns (channel, upstream call), the call being None when it was refused at
    once (``listener.call_finished`` has then run). Raises `GRPCError` when no
    endpoint can take the call.
    """
    channel = monitor.pick(avoid)
    upstream_call = channel.start_call(call.method, call.metadata, listener, call.time_remaining())
    if upstream_call.closed:
        return channel, None
    call.registerProducer(upstream_call)
    upstream_call.registerProducer(call)
    return channel, upstream_call

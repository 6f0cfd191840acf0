"""HPACK encoder and decoder that remember the header blocks of a connection.

A proxied unary call has the same few header lists over and over: the response
headers and trailers this proxy sends, the request headers it sends upstream,
and the blocks grpc-go peers send back (all indexed once their dynamic table
holds them). hpack encodes and decodes each one field by field again, about a
tenth of a proxied call's CPU.

Encoding or decoding depends only on the input and on the dynamic table (its
entries, its size) and limits. So a block is remembered only when the work left
the table as it was, and the memory is dropped whenever the table is found
changed: identity of the newest entry (hpack adds every entry as a new tuple at
the front of its deque), number of entries and maximum size, plus the limits.
A pending table size change (``resized``) always goes the ordinary way.

Both override only the public ``encode``/``decode`` of hpack's classes; h2 uses
them through ``H2Connection.encoder``/``decoder``.
"""

from hpack import Decoder, Encoder

# Per connection: at most this many remembered blocks, each at most this long.
MAX_ENTRIES = 32
MAX_BLOCK = 1024


def _table_state(table):
    entries = table.dynamic_entries
    return (entries[0] if entries else None, len(entries), table.maxsize)


def _same(a, b):
    return a is not None and b is not None and a[0] is b[0] and a[1:] == b[1:]


class CachingEncoder(Encoder):
    def __init__(self):
        super().__init__()
        self._blocks = {}
        self._state = None

    def encode(self, headers, huffman=True):
        table = self.header_table
        if type(headers) is not list or table.resized:
            self._state = None
            return super().encode(headers, huffman)
        for header in headers:
            # HeaderTuple subclasses (never-indexed fields) compare equal to
            # plain tuples: they always go the ordinary way.
            if type(header) is not tuple or len(header) != 2:
                self._state = None
                return super().encode(headers, huffman)
        state = _table_state(table)
        if not _same(state, self._state):
            self._blocks.clear()
            self._state = state
        key = (tuple(headers), huffman)
        block = self._blocks.get(key)
        if block is not None:
            return block
        block = super().encode(headers, huffman)
        after = _table_state(table)
        if not _same(after, state):
            self._blocks.clear()
            self._state = after
        elif len(block) <= MAX_BLOCK:
            if len(self._blocks) >= MAX_ENTRIES:
                self._blocks.clear()
            self._blocks[key] = block
        return block


class CachingDecoder(Decoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._headers = {}
        self._state = None

    def _full_state(self):
        return _table_state(self.header_table) + (self.max_header_list_size, self.max_allowed_table_size)

    def decode(self, data, raw=False):
        if type(data) is not bytes or len(data) > MAX_BLOCK:
            self._state = None
            return super().decode(data, raw)
        state = self._full_state()
        if not _same(state, self._state):
            self._headers.clear()
            self._state = state
        key = (data, raw)
        headers = self._headers.get(key)
        if headers is not None:
            return list(headers)
        headers = super().decode(data, raw)
        after = self._full_state()
        if not _same(after, state):
            self._headers.clear()
            self._state = after
        else:
            if len(self._headers) >= MAX_ENTRIES:
                self._headers.clear()
            self._headers[key] = tuple(headers)
        return headers

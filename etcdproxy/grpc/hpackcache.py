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
them through ``H2Connection.encoder``/``decoder``. The table's size is read as
hpack's ``maxsize`` property keeps it (``_maxsize``, hpack 4.0 and 4.1): the
property costs a Python call, and the check runs twice per header block.
"""

from hpack import Decoder, Encoder

# Per connection: at most this many remembered blocks, each at most this long.
MAX_ENTRIES = 32
MAX_BLOCK = 1024


def _table_as_expected():
    """Whether hpack's table keeps its size as read here (``_maxsize``, what
    its ``maxsize`` property returns); on any other hpack nothing is remembered."""
    table = Encoder().header_table
    if getattr(table, "_maxsize", None) != table.maxsize:
        return False
    table.maxsize = 100
    return table._maxsize == table.maxsize == 100


_REMEMBERING = _table_as_expected()


_UNKNOWN = object()  # the table state is to be noted afresh


class CachingEncoder(Encoder):
    def __init__(self):
        super().__init__()
        self._blocks = {}
        # The table as the remembered blocks found it: newest entry, entries, size.
        self._first, self._count, self._size = _UNKNOWN, None, None

    def encode(self, headers, huffman=True):
        table = self.header_table
        if type(headers) is not list or table.resized or not _REMEMBERING:
            self._first = _UNKNOWN
            return super().encode(headers, huffman)
        for header in headers:
            # HeaderTuple subclasses (never-indexed fields) compare equal to
            # plain tuples: they always go the ordinary way.
            if type(header) is not tuple or len(header) != 2:
                self._first = _UNKNOWN
                return super().encode(headers, huffman)
        entries = table.dynamic_entries
        first = entries[0] if entries else None
        count = len(entries)
        if first is not self._first or count != self._count or table._maxsize != self._size:
            self._blocks.clear()
            self._first, self._count, self._size = first, count, table._maxsize
        key = (tuple(headers), huffman)
        block = self._blocks.get(key)
        if block is not None:
            return block
        block = super().encode(headers, huffman)
        if (entries[0] if entries else None) is not first or len(entries) != count or table._maxsize != self._size:
            self._blocks.clear()
            self._first = _UNKNOWN
        elif len(block) <= MAX_BLOCK:
            if len(self._blocks) >= MAX_ENTRIES:
                self._blocks.clear()
            self._blocks[key] = block
        return block


class CachingDecoder(Decoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._headers = {}
        self._state = None  # (newest entry, entries, size, the two limits)

    def _full_state(self):
        table = self.header_table
        entries = table.dynamic_entries
        return (entries[0] if entries else None, len(entries), table._maxsize,
                self.max_header_list_size, self.max_allowed_table_size)

    def decode(self, data, raw=False):
        if type(data) is not bytes or len(data) > MAX_BLOCK or not _REMEMBERING:
            self._state = None
            return super().decode(data, raw)
        table = self.header_table
        entries = table.dynamic_entries
        state = (entries[0] if entries else None, len(entries), table._maxsize,  # _full_state(), inline
                 self.max_header_list_size, self.max_allowed_table_size)
        known = self._state
        if known is None or state[0] is not known[0] or state[1:] != known[1:]:
            self._headers.clear()
            self._state = known = state
        key = (data, raw)
        headers = self._headers.get(key)
        if headers is not None:
            return list(headers)
        headers = super().decode(data, raw)
        after = self._full_state()
        if after[0] is not known[0] or after[1:] != known[1:]:
            self._headers.clear()
            self._state = None
        else:
            if len(self._headers) >= MAX_ENTRIES:
                self._headers.clear()
            self._headers[key] = tuple(headers)
        return headers

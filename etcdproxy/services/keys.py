"""Key ranges as etcd reads them."""


def prefix_end(prefix):
    """The range_end of "every key starting with ``prefix``" (b"\\0", the end
    of the keyspace, when the prefix is empty or all 0xff bytes)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)

"""The HPACK coders that remember header blocks give exactly what hpack's own
give, whatever the dynamic table goes through (adds, evictions, size changes,
never-indexed fields)."""

import random
import unittest

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from etcdproxy.grpc import hpackcache
from etcdproxy.grpc.hpackcache import CachingDecoder, CachingEncoder

NAMES = [b"a", b"b", b"content-type", b"x-long" * 10, b":status", b"grpc-status"]
VALUES = [b"0", b"1", b"application/grpc", b"v" * 100, b"200"]


class HpackCacheTests(unittest.TestCase):
    def test_same_blocks_and_tables_as_hpack(self):
        rng = random.Random(1)
        hits = 0
        for _ in range(100):
            cached_enc, plain_enc = CachingEncoder(), Encoder()
            cached_dec, plain_dec = CachingDecoder(), Decoder()
            lists = [[(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randint(1, 4))]
                     for _ in range(6)]
            for _ in range(150):
                if rng.random() < 0.03:
                    size = rng.choice([0, 64, 256, 4096])
                    cached_enc.header_table_size = plain_enc.header_table_size = size
                headers = list(rng.choice(lists))
                if rng.random() < 0.05:
                    headers.append(NeverIndexedHeaderTuple(b"a", b"0"))
                if rng.random() < 0.1:
                    headers.append((rng.choice(NAMES), b"%d" % rng.randint(0, 50)))
                before = len(cached_enc._blocks)
                block = cached_enc.encode(list(headers))
                hits += before and len(cached_enc._blocks) == before
                self.assertEqual(block, plain_enc.encode(list(headers)))
                decoded = cached_dec.decode(block, raw=True)
                expected = plain_dec.decode(block, raw=True)
                self.assertEqual(decoded, expected)
                self.assertEqual([type(h) for h in decoded], [type(h) for h in expected])
                self.assertEqual(list(cached_dec.header_table.dynamic_entries),
                                 list(plain_dec.header_table.dynamic_entries))
        self.assertGreater(hits, 1000)

    def test_blocks_are_remembered_with_an_empty_table(self):
        enc = CachingEncoder()
        enc.header_table_size = 0
        enc.encode([(b"a", b"1")])  # the size change goes the ordinary way
        first = enc.encode([(b"a", b"1")])
        self.assertEqual(len(enc.header_table.dynamic_entries), 0)
        self.assertEqual(enc._blocks, {(((b"a", b"1"),), True): first})
        self.assertIs(enc.encode([(b"a", b"1")]), first)

    def test_decoder_limit_change_is_seen(self):
        enc, dec = Encoder(), CachingDecoder()
        block = enc.encode([(b"x-key", b"v" * 200)])
        dec.decode(block)
        again = enc.encode([(b"x-key", b"v" * 200)])  # indexed now: same table afterwards
        dec.decode(again)
        dec.decode(again)
        dec.max_header_list_size = 100
        from hpack import OversizedHeaderListError
        with self.assertRaises(OversizedHeaderListError):
            dec.decode(again)


class HpackAsWrittenAgainstTests(unittest.TestCase):
    def test_blocks_are_remembered_on_the_installed_hpack(self):
        # (off on an hpack whose table keeps its size otherwise: a test fails, not only the speed)
        self.assertTrue(hpackcache._table_as_expected())
        self.assertTrue(hpackcache._REMEMBERING)

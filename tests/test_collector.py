"""etcdproxy.collector: the garbage collector as the proxy runs it."""

import gc

from twisted.trial import unittest

from etcdproxy.collector import YOUNG_THRESHOLD, tune_for_serving
from etcdproxy.tap import ProxyService


class CollectorTests(unittest.TestCase):
    def setUp(self):
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_young_collections_spaced_and_startup_objects_frozen(self):
        gc.unfreeze()
        tune_for_serving()
        self.assertEqual(gc.get_threshold()[0], YOUNG_THRESHOLD)
        self.assertGreater(gc.get_freeze_count(), 1000)  # the modules, at least

    def test_the_service_tree_tunes_it_when_started(self):
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        top = ProxyService()
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, 10, 10))
        self.assertGreater(gc.get_freeze_count(), 1000)

"""Shared test helpers: which proxy to test, and class-level fixtures that work
under both pytest and trial.

trial never calls ``setUpClass``/``tearDownClass``. ``ClassFixtureTestCase``
makes them work there too: when a test runs and the class was not set up by
the runner, it calls ``setUpClass`` itself, and calls ``tearDownClass`` (then
``doClassCleanups``) after the last of the class' tests that trial loaded
(trial builds every test instance before running any). Under pytest (and
stdlib unittest) the runner's own calls are used unchanged.

``EtcdProxyTestCase`` starts one single-member etcd cluster (``cls.etcd``) and
one proxy in front of it (``cls.proxy``) for the whole class; ``cls.direct``
and ``cls.proxied`` are their endpoints.
"""
import os
import sys

from twisted.trial import unittest

from tests.support.etcd import EtcdCluster
from tests.support.proxy import KINDS, ProxyProcess

__all__ = ["proxy_kind", "ClassFixtureTestCase", "EtcdProxyTestCase"]


def proxy_kind():
    """The proxy under test: $ETCDPROXY_TEST_KIND, "python" (ours) by default,
    or "go" (etcd's own grpc-proxy)."""
    kind = os.environ.get("ETCDPROXY_TEST_KIND", "python").strip() or "python"
    if kind not in KINDS:
        raise ValueError("ETCDPROXY_TEST_KIND must be one of %s, not %r" % (KINDS, kind))
    return kind


_NATIVE = "native"      # the runner called setUpClass (pytest, unittest)
_LAZY = "lazy"          # we called it (trial)
_FAILED = "failed"      # our lazy setUpClass raised


class ClassFixtureTestCase(unittest.TestCase):
    """A trial TestCase whose setUpClass/tearDownClass run under trial too."""

    _cf_state = None
    _cf_pending = 0
    _cf_error = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._cf_state = None
        cls._cf_pending = 0
        cls._cf_error = None
        own = cls.__dict__.get("setUpClass")
        if own is not None:
            func = own.__func__

            def setUpClass(klass, _func=func):
                if klass._cf_state is None:
                    klass._cf_state = _NATIVE
                return _func(klass)
            cls.setUpClass = classmethod(setUpClass)

    @classmethod
    def setUpClass(cls):
        if cls._cf_state is None:
            cls._cf_state = _NATIVE

    @classmethod
    def tearDownClass(cls):
        pass

    def __init__(self, methodName="runTest"):
        super().__init__(methodName)
        type(self)._cf_pending += 1

    def run(self, result=None):
        cls = type(self)
        if cls._cf_state is None:
            cls._cf_state = _LAZY
            try:
                cls.setUpClass()
                cls._cf_state = _LAZY
                cls._cf_error = None
            except BaseException:
                cls._cf_state = _FAILED
                cls._cf_error = sys.exc_info()
                try:
                    cls.doClassCleanups()
                except Exception:
                    pass
        try:
            if cls._cf_state == _FAILED:
                result.startTest(self)
                try:
                    result.addError(self, cls._cf_error)
                finally:
                    result.stopTest(self)
                return result
            return super().run(result)
        finally:
            cls._cf_pending -= 1
            if cls._cf_pending <= 0 and cls._cf_state in (_LAZY, _FAILED):
                state, cls._cf_state = cls._cf_state, None
                if state == _LAZY:
                    self._cf_teardown(result)

    def _cf_teardown(self, result):
        cls = type(self)
        for fn in (cls.tearDownClass, cls.doClassCleanups):
            try:
                fn()
            except BaseException:
                result.startTest(self)
                try:
                    result.addError(self, sys.exc_info())
                finally:
                    result.stopTest(self)


class EtcdProxyTestCase(ClassFixtureTestCase):
    """One etcd member and one proxy (kind from $ETCDPROXY_TEST_KIND) per
    class. Override ``etcd_args``/``proxy_args`` to pass extra flags."""

    etcd_size = 1
    etcd_args = ()
    etcd_binary = None  # None: $ETCDPROXY_TEST_ETCD, else Debian's etcd
    proxy_args = ()
    kind = None     # None: proxy_kind()

    @classmethod
    def setUpClass(cls):
        cls.kind = cls.kind or proxy_kind()
        cls.etcd = EtcdCluster(size=cls.etcd_size, extra_args=cls.etcd_args, binary=cls.etcd_binary)
        cls.proxy = None
        try:
            cls.etcd.start()
            cls.proxy = ProxyProcess(cls.etcd.endpoints, kind=cls.kind,
                                     extra_args=cls.proxy_args)
            cls.proxy.start()
        except BaseException:
            cls._stop_fixtures()
            raise
        cls.direct = cls.etcd.endpoint
        cls.proxied = cls.proxy.address

    @classmethod
    def _stop_fixtures(cls):
        try:
            if getattr(cls, "proxy", None) is not None:
                cls.proxy.stop()
        finally:
            if getattr(cls, "etcd", None) is not None:
                cls.etcd.stop()

    @classmethod
    def tearDownClass(cls):
        cls._stop_fixtures()

"""Acceptance: etcdctl (Debian's 3.4, a grpc-go client) gets the same results
through the proxy as from etcd directly.

Each scenario runs twice on the same etcd: once against etcd itself ("direct")
and once against the proxy ("proxy"), on separate key prefixes. The outputs are
normalized for what legitimately differs (the key prefix, the endpoint address,
revisions relative to the scenario's start, lease ids, remaining TTLs, timings)
and must then be equal.

The proxy under test is ours by default; ETCDPROXY_TEST_KIND=go runs the same
tests against etcd's own grpc-proxy.
"""
import base64
import difflib
import json
import os
import pprint
import re
import shutil
import signal
import tempfile
import time

from tests.support.etcdctl import EtcdctlProcess, etcdctl
from tests.support.targets import EtcdProxyTestCase


REV_FIELDS = frozenset(["revision", "create_revision", "mod_revision", "compact_revision",
                        "CompactRevision"])
BYTES_FIELDS = frozenset(["key", "value", "range_end"])
LEASE_FIELDS = frozenset(["ID", "id", "lease"])
# lease ids in text: "%016x" (lease commands) or "%x" (elect/lock keys)
HEX_ID = re.compile(r"(?<![\w+\-.])[0-9a-f]{8,16}(?![\w.])")
GRPC_CODE = re.compile(r"code = (\w+)")


def b64(data):
    return base64.b64encode(data.encode()).decode()


def unb64(text):
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return "b64:" + text


def parse_json_line(line):
    """``line`` parsed if it is a JSON object/array, else None."""
    line = line.strip()
    if line.startswith(("{", "[")):
        try:
            return json.loads(line)
        except ValueError:
            pass
    return None


def json_lines(text):
    """Every line of ``text`` that is a JSON document, parsed."""
    return [d for d in map(parse_json_line, text.splitlines()) if d is not None]


def header_revision(cp_or_obj):
    obj = json_lines(cp_or_obj.stdout)[0] if hasattr(cp_or_obj, "stdout") else cp_or_obj
    hdr = obj.get("header", obj)
    return int(hdr["revision"])


class Side(object):
    """One run of a scenario: against etcd ("direct") or the proxy ("proxy")."""

    def __init__(self, name, endpoint, prefix, etcd_endpoint):
        self.name = name
        self.ep = endpoint
        self.prefix = prefix
        self.etcd_ep = etcd_endpoint     # etcd itself, for writes "from elsewhere"
        self.subst = []                  # more (old, new) text replacements

    def k(self, suffix=""):
        return self.prefix + suffix

    def ctl(self, *args, **kw):
        kw.setdefault("check", False)
        return etcdctl(self.ep, *args, **kw)

    def __repr__(self):
        return "<%s %s %s>" % (self.name, self.ep, self.prefix)


class Normalizer(object):
    """Rewrites what legitimately differs between the direct and the proxied
    run: key prefix, endpoint, revisions (relative to ``base``), lease ids
    (numbered by first appearance), remaining TTLs, durations."""

    def __init__(self, side, base):
        self.side = side
        self.base = base
        self.ids = {}

    def lease(self, value):
        value = int(value)
        if value == 0:
            return 0
        if value not in self.ids:
            self.ids[value] = "<id%d>" % (len(self.ids) + 1)
        return self.ids[value]

    def rev(self, value):
        value = int(value)
        if value <= 0:
            return value
        return "rev%+d" % (value - self.base)

    def text(self, s):
        s = s.replace(self.side.prefix, "<P>/").replace(self.side.prefix[:-1] + "0", "<P>0")
        s = s.replace("".join("\\x%02x" % b for b in self.side.prefix.encode()), "<P>/")  # --hex
        s = s.replace(self.side.ep, "<EP>")
        for old, new in self.side.subst:
            s = s.replace(old, new)
        s = re.sub(r"remaining\(\d+s\)", "remaining(<n>s)", s)
        s = re.sub(r"attached keys\(\[([^]]*)\]\)",        # lease keys: no set order
                   lambda m: "attached keys([%s])" % " ".join(sorted(m.group(1).split())), s)
        s = re.sub(r"took = [0-9.]+\w+", "took = <t>", s)
        s = re.sub(r'"(Revision|CreateRevision|ModRevision|CompactRevision)" : (\d+)',
                   lambda m: '"%s" : %s' % (m.group(1), self.rev(m.group(2))), s)     # -w fields
        s = re.sub(r'"(Lease|ID)" : (\d+)',
                   lambda m: '"%s" : %s' % (m.group(1), self.lease(m.group(2))), s)
        s = re.sub(r"progress notify: (\d+)", lambda m: "progress notify: " + self.rev(m.group(1)), s)
        s = re.sub(r"compacted revision (\d+)",
                   lambda m: "compacted revision " + self.rev(m.group(1)), s)
        s = HEX_ID.sub(lambda m: self.lease(int(m.group(0), 16)), s)
        return s

    def json(self, obj, field=None):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in BYTES_FIELDS and isinstance(v, str):
                    out[k] = self.text(unb64(v))
                elif k == "keys" and isinstance(v, list):     # lease keys: no set order
                    out[k] = sorted(self.text(unb64(x)) for x in v)
                elif k in REV_FIELDS and isinstance(v, int):
                    out[k] = self.rev(v)
                elif k in LEASE_FIELDS and isinstance(v, int):
                    out[k] = self.lease(v)
                elif k == "ttl" and isinstance(v, int) and v > 0:
                    out[k] = "<remaining>"     # remaining TTL: checked separately
                elif k in ("Endpoint", "endpoint") and isinstance(v, str):
                    out[k] = self.text(v)
                elif k == "took":
                    out[k] = "<t>"
                else:
                    out[k] = self.json(v, k)
            return out
        if isinstance(obj, list):
            return [self.json(x, field) for x in obj]
        if isinstance(obj, str):
            return self.text(obj)
        return obj

    def errors(self, stderr):
        """The user-visible stderr lines (not the JSON log lines), and the
        gRPC codes etcdctl logged."""
        lines = [self.text(l.strip()) for l in stderr.splitlines()
                 if l.strip() and parse_json_line(l) is None]
        codes = sorted(set(GRPC_CODE.findall(stderr)))
        return lines, codes

    def result(self, cp):
        """A CompletedProcess -> comparable dict: "out" is the normalized
        stdout text, or, when it holds JSON, the list of its non-empty lines
        (JSON ones parsed)."""
        stdout = cp.stdout
        if json_lines(stdout):
            out = []
            for line in stdout.splitlines():
                doc = parse_json_line(line)
                if doc is not None:
                    out.append(self.json(doc))
                elif line.strip():
                    out.append(self.text(line.strip()))
        else:
            out = self.text(stdout)
        errs, codes = self.errors(cp.stderr)
        return {"rc": cp.returncode, "out": out, "err": errs, "codes": codes}

    def any(self, x):
        if isinstance(x, Done):
            return x.value
        if hasattr(x, "returncode") and hasattr(x, "stdout"):
            return self.result(x)
        if isinstance(x, (dict, list)):
            return self.json(x)
        if isinstance(x, str):
            return self.text(x)
        if isinstance(x, tuple):
            return tuple(self.any(y) for y in x)
        return x


def recent_keep_alive(cp, ttl):
    """A ``keep-alive --once -w json`` right after another one: the lease
    coalescer answers it from etcd's last answer, with what is left of the TTL
    rounded down (59 of 60), etcd itself with the full TTL; either is right."""
    cp.stdout = re.sub(r'"TTL":(\d+)', lambda m: '"TTL":"<%d..%d>"' % (ttl - 1, ttl)
                       if ttl - 1 <= int(m.group(1)) <= ttl else m.group(0), cp.stdout)
    return cp


class Done(object):
    """A scenario result that is already normalized (run_both keeps it)."""

    def __init__(self, value):
        self.value = value


def diff(a, b):
    fa = pprint.pformat(a, width=110).splitlines()
    fb = pprint.pformat(b, width=110).splitlines()
    return "\n".join(difflib.unified_diff(fa, fb, "direct", "proxy", lineterm="", n=4))


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


class EtcdctlTestCase(EtcdProxyTestCase):
    """Helpers to run one scenario directly and through the proxy."""

    # the support helpers raise AssertionError: make trial count it as a failure
    failureException = AssertionError

    def sides(self):
        name = self._testMethodName
        sides = [Side("direct", self.direct, "%s/direct/" % name, self.direct),
                 Side("proxy", self.proxied, "%s/proxy/" % name, self.direct)]
        for s in sides:
            s.subst.append((s.name + "-", "<S>-"))      # per-side user/role names
        return sides

    auth_args = ()      # credentials for our own probes while auth is on

    def current_revision(self):
        return header_revision(etcdctl(self.direct, *self.auth_args + ("get", "--limit=1", "-w",
                                       "json", "current-revision-probe")))

    def run_both(self, scenario, sides=None):
        """Runs ``scenario(side)`` directly then through the proxy; returns
        the two normalized results."""
        results = []
        for side in sides or self.sides():
            self.scenario_base = self.current_revision()
            norm = Normalizer(side, self.scenario_base)
            raw = scenario(side)
            results.append([norm.any(x) for x in raw])
        return results

    def assertSame(self, direct, proxy, msg=""):
        if direct != proxy:
            self.fail("%s direct and proxied results differ (%s proxy):\n%s"
                      % (msg, self.kind, diff(direct, proxy)))

    def compare(self, scenario):
        direct, proxy = self.run_both(scenario)
        self.assertSame(direct, proxy)
        return direct

    def ok(self, cp):
        """Asserts a CompletedProcess succeeded; returns it."""
        if cp.returncode != 0:
            self.fail("etcdctl %s failed (%d): %s %s" % (cp.args[1:], cp.returncode,
                                                         cp.stderr, cp.stdout))
        return cp

    def background(self, side, *args, **kw):
        p = EtcdctlProcess(side.ep, *args, **kw)
        self.addCleanup(p.stop, signal.SIGKILL)
        return p.start()

    def sync_watchers(self, side, key, watchers, timeout=10):
        """Makes sure live watchers (``etcdctl watch -w json`` started
        without --rev) are in place: writes ``key``=sync until every watcher
        printed that event (a ``(watcher, n)`` pair: n times, for n watches
        in one etcdctl), then deletes ``key``. Returns the revision of that
        delete; ``events_after_sync`` drops everything up to it."""
        watchers = [w if isinstance(w, tuple) else (w, 1) for w in watchers]
        deadline = time.monotonic() + timeout
        while not all(sum(1 for e in watch_events(w.lines) if e["kv"].get("value") == b64("sync"))
                      >= n for w, n in watchers):
            if time.monotonic() > deadline:
                self.fail("%s: watchers never saw the sentinel after %ss: %s" % (
                    side.name, timeout, [w.lines for w, _ in watchers]))
            self.ok(side.ctl("put", key, "sync"))
            time.sleep(0.2)
        return header_revision(self.ok(side.ctl("del", key, "-w", "json")))


def watch_responses(lines):
    out = []
    for l in lines:
        l = l.strip()
        if l.startswith("{"):
            out.append(json.loads(l))
    return out


def watch_events(lines):
    """Flattened events of the JSON watch responses, each with its type."""
    events = []
    for r in watch_responses(lines):
        for ev in r.get("Events") or []:
            e = dict(ev)
            e["type"] = {0: "PUT", 1: "DELETE"}[ev.get("type", 0)]
            events.append(e)
    return events


def events_after_sync(lines, deletes=1):
    """The watch events after the first ``deletes`` DELETEs (see
    sync_watchers)."""
    evs = watch_events(lines)
    for i, e in enumerate(evs):
        if e["type"] == "DELETE":
            deletes -= 1
            if deletes == 0:
                return evs[i + 1:]
    return []


def count_events(n):
    return lambda lines: len(watch_events(lines)) >= n


def check_txn_grouping(testcase, lines):
    """Events that share a revision (one txn) arrive in one response."""
    seen = {}
    for i, r in enumerate(watch_responses(lines)):
        for ev in r.get("Events") or []:
            rev = ev["kv"]["mod_revision"]
            if seen.setdefault(rev, i) != i:
                testcase.fail("events of revision %d split over responses: %s" % (rev, lines))


# ---------------------------------------------------------------------------


class KVTests(EtcdctlTestCase):

    def test_put_get(self):
        def scenario(s):
            out = []
            for key, value in [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]:
                out.append(s.ctl("put", s.k(key), value))
            mid = s.ctl("put", s.k("b"), "22", "-w", "json")
            out.append(mid)
            out.append(s.ctl("put", s.k("c"), "33", "--prev-kv"))
            out.append(s.ctl("put", s.k("d"), "44", "--prev-kv", "-w", "json"))
            out.append(s.ctl("put", s.k("e"), "", "-w", "json"))
            out += [
                s.ctl("get", s.k("a")),
                s.ctl("get", s.k("a"), "-w", "json"),
                s.ctl("get", s.k("nope"), "-w", "json"),
                s.ctl("get", s.k("nope")),
                s.ctl("get", "--prefix", s.k()),
                s.ctl("get", "--prefix", s.k(), "-w", "json"),
                s.ctl("get", s.k("b"), s.k("d")),               # range [b, d)
                s.ctl("get", s.k("b"), s.k("d"), "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "--limit=2", "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "--limit=2"),
                s.ctl("get", "--prefix", s.k(), "--sort-by=MODIFY", "--order=DESCEND"),
                s.ctl("get", "--prefix", s.k(), "--sort-by=VALUE", "--order=ASCEND"),
                s.ctl("get", "--prefix", s.k(), "--sort-by=VERSION", "--order=DESCEND",
                      "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "--sort-by=CREATE", "--order=DESCEND",
                      "--limit=3"),
                s.ctl("get", "--prefix", s.k(), "--order=DESCEND"),
                s.ctl("get", "--prefix", s.k(), "--keys-only"),
                s.ctl("get", "--prefix", s.k(), "--keys-only", "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "--print-value-only"),
                s.ctl("get", "--prefix", s.k(), "--hex"),
                s.ctl("get", "--prefix", s.k(), "--consistency=s", "-w", "json"),
                s.ctl("get", s.k("b"), "--consistency=s"),
                s.ctl("get", "--prefix", s.k(), "-w", "fields"),
                # historical reads
                s.ctl("get", "--prefix", s.k(), "--rev=%d" % header_revision(mid), "-w", "json"),
                s.ctl("get", s.k("b"), "--rev=%d" % (header_revision(mid) - 1)),
                s.ctl("get", s.k("b"), "--rev=%d" % (header_revision(mid) + 100)),
            ]
            return out
        r = self.compare(scenario)
        self.assertEqual(r[8]["out"], "<P>/a\n1\n")
        self.assertEqual(r[14]["out"], "<P>/b\n22\n<P>/c\n33\n")
        self.assertEqual(r[15]["out"][0]["count"], 2)
        self.assertEqual(r[16]["out"][0]["count"], 5)
        self.assertTrue(r[16]["out"][0]["more"])
        self.assertEqual(len(r[16]["out"][0]["kvs"]), 2)
        self.assertEqual(r[-1]["err"], ["Error: etcdserver: mvcc: required revision is a future revision"])
        self.assertEqual(r[-2]["out"], "<P>/b\n2\n")

    def test_serializable_get_sees_writes(self):
        """A serializable read (cacheable) shows writes made through the
        proxy and, soon, writes made on etcd directly."""
        def scenario(s):
            out = [s.ctl("put", s.k("x"), "1"),
                   s.ctl("get", s.k("x"), "--consistency=s", "--print-value-only")]
            out.append(s.ctl("put", s.k("x"), "2"))
            out.append(s.ctl("get", s.k("x"), "--consistency=s", "--print-value-only"))
            out.append(s.ctl("del", s.k("x")))
            out.append(s.ctl("get", s.k("x"), "--consistency=s", "--print-value-only"))
            # a write from elsewhere: straight to etcd
            etcdctl(s.etcd_ep, "put", s.k("x"), "3")
            t0 = time.monotonic()
            wait_until(lambda: s.ctl("get", s.k("x"), "--consistency=s",
                                     "--print-value-only").stdout == "3\n",
                       3.0, interval=0.1, what="%s to show a write made on etcd" % s.name)
            self.assertLess(time.monotonic() - t0, 3.0)
            out.append(s.ctl("get", s.k("x"), "--consistency=s", "-w", "json"))
            return out
        r = self.compare(scenario)
        self.assertEqual([x["out"] for x in r[1:6:2]], ["1\n", "2\n", ""])

    def test_large_values(self):
        """Values of ~1 MiB (put from stdin) and a ~3 MiB range response."""
        payloads = [(c * (1024 * 1024 - 100)) for c in "xyz"]

        def scenario(s):
            out = []
            for i, p in enumerate(payloads):
                out.append(s.ctl("put", s.k("big%d" % i), input=p))
            got = s.ctl("get", "--prefix", s.k(), "--print-value-only", timeout=30)
            self.assertEqual(got.stdout, "".join(p + "\n" for p in payloads),
                             "%s: big values came back wrong (%d bytes)" % (s.name, len(got.stdout)))
            out.append(s.ctl("get", "--prefix", s.k(), "--keys-only"))
            return out
        self.compare(scenario)

    def test_del(self):
        def scenario(s):
            for key in "abcdefg":
                self.ok(s.ctl("put", s.k(key), key * 3))
            return [
                s.ctl("del", s.k("a")),
                s.ctl("del", s.k("a")),                          # already gone: 0
                s.ctl("del", s.k("b"), "--prev-kv"),
                s.ctl("del", s.k("c"), "--prev-kv", "-w", "json"),
                s.ctl("del", s.k("d"), s.k("f")),                # range [d, f)
                s.ctl("del", "--prefix", s.k(), "--prev-kv", "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "-w", "json"),
                s.ctl("del", "--prefix", s.k()),
            ]
        r = self.compare(scenario)
        self.assertEqual([x["out"] for x in (r[0], r[1], r[4], r[7])], ["1\n", "0\n", "2\n", "0\n"])
        self.assertEqual(r[5]["out"][0]["deleted"], 2)
        self.assertEqual([kv["key"] for kv in r[5]["out"][0]["prev_kvs"]], ["<P>/f", "<P>/g"])

    def test_txn(self):
        def txn(s, compares, success, failure, *args):
            text = "".join("".join(l + "\n" for l in part) + "\n"
                           for part in (compares, success, failure))
            return s.ctl("txn", *args, input=text)

        def scenario(s):
            k, f = s.k("k"), s.k("flag")
            out = [s.ctl("put", k, "v1")]
            # success branch
            out.append(txn(s, ['value("%s") = "v1"' % k, 'mod("%s") > "0"' % k],
                           ["put %s v2" % k, "get %s" % k, "put %s on" % f],
                           ["put %s failed" % f]))
            # failure branch
            out.append(txn(s, ['value("%s") = "v1"' % k],
                           ["put %s never" % f],
                           ["put %s off" % f, "get %s" % k, "del %s" % s.k("nothing")]))
            # json, version/create compares, range get in a branch
            out.append(txn(s, ['version("%s") = "2"' % k, 'create("%s") > "0"' % k],
                           ["put %s v3" % k, "get --prefix %s" % s.k()],
                           [], "-w", "json"))
            out.append(txn(s, ['value("%s") != "v3"' % k], [], ["get %s" % k], "-w", "json"))
            # no compares at all: success
            out.append(txn(s, [], ["put %s x" % s.k("y")], []))
            # a key put twice in one txn: etcd refuses
            out.append(txn(s, [], ["put %s 1" % s.k("z"), "put %s 2" % s.k("z")], []))
            out.append(s.ctl("get", "--prefix", s.k(), "-w", "json"))
            return out
        r = self.compare(scenario)
        self.assertEqual(r[1]["out"], "SUCCESS\n\nOK\n\n<P>/k\nv2\n\nOK\n")
        self.assertEqual(r[2]["out"], "FAILURE\n\nOK\n\n<P>/k\nv2\n\n0\n")
        self.assertEqual(r[5]["out"], "SUCCESS\n\nOK\n")
        self.assertFalse(r[4]["out"][0].get("succeeded", False))
        self.assertEqual(r[7]["out"][0]["count"], 3)
        self.assertTrue(r[1]["out"].startswith("SUCCESS\n"), r[1])
        self.assertTrue(r[2]["out"].startswith("FAILURE\n"), r[2])
        self.assertTrue(r[3]["out"][0]["succeeded"])
        self.assertEqual(r[6]["rc"], 1)
        self.assertIn("duplicate key", " ".join(r[6]["err"]))


class CompactionTests(EtcdctlTestCase):

    def test_compaction(self):
        def scenario(s):
            k = s.k("k")
            revs = [header_revision(self.ok(s.ctl("put", k, "v%d" % i, "-w", "json")))
                    for i in range(1, 5)]
            return [
                s.ctl("compaction", revs[1]),
                s.ctl("get", k, "--rev=%d" % revs[0]),                  # compacted
                s.ctl("get", k, "--rev=%d" % revs[0], "-w", "json"),
                s.ctl("get", k, "--rev=%d" % revs[1], "-w", "json"),    # still there
                s.ctl("get", k, "--rev=%d" % revs[2]),
                s.ctl("compaction", revs[0]),                           # already compacted
                s.ctl("compaction", revs[3] + 1000),                    # future
                s.ctl("compaction", "--physical", revs[2]),
                s.ctl("get", k, "--rev=%d" % revs[1]),
                s.ctl("get", k, "-w", "json"),
                # a watch from a compacted revision is cancelled by the server
                s.ctl("watch", "--rev=%d" % revs[0], k, timeout=10),
                s.ctl("watch", "--rev=%d" % revs[1], k, "-w", "json", timeout=10),
            ]
        r = self.compare(scenario)
        self.assertEqual(r[0]["out"], "compacted revision rev+2\n")
        compacted = "Error: etcdserver: mvcc: required revision has been compacted"
        self.assertEqual(r[1]["err"], [compacted])
        self.assertEqual(r[1]["codes"], ["OutOfRange"])
        self.assertEqual(r[5]["err"], [compacted])
        self.assertEqual(r[6]["err"], ["Error: etcdserver: mvcc: required revision is a future revision"])
        self.assertEqual(r[4]["out"], "<P>/k\nv3\n")
        self.assertEqual(r[10]["err"], ["watch was canceled (etcdserver: mvcc: required revision "
                                        "has been compacted)",
                                        "Error: watch is canceled by the server"])
        self.assertEqual(r[11]["out"][0]["CompactRevision"], "rev+3")
        self.assertTrue(r[11]["out"][0]["Canceled"])


class WatchTests(EtcdctlTestCase):

    def test_watch_key(self):
        def scenario(s):
            k = s.k("k")
            w = self.background(s, "watch", "-w", "json", k)
            base = self.sync_watchers(s, k, [w])
            for args in (["put", k, "1"], ["put", k, "2"], ["put", s.k("other"), "x"],
                         ["del", k], ["put", k, "3"], ["del", k], ["del", k]):
                self.ok(s.ctl(*args))
            w.wait_for(lambda lines: len(events_after_sync(lines)) >= 5, 10)
            time.sleep(0.2)         # nothing more may come
            w.stop()
            check_txn_grouping(self, w.lines)
            for r in watch_responses(w.lines):
                self.assertFalse(r["Canceled"])
                self.assertEqual(r["CompactRevision"], 0)
            return [Done([Normalizer(s, base).json(e) for e in events_after_sync(w.lines)])]
        (events,) = self.compare(scenario)
        self.assertEqual([(e["type"], e["kv"]["key"], e["kv"].get("value")) for e in events],
                         [("PUT", "<P>/k", "1"), ("PUT", "<P>/k", "2"), ("DELETE", "<P>/k", None),
                          ("PUT", "<P>/k", "3"), ("DELETE", "<P>/k", None)])
        self.assertEqual([e["kv"]["mod_revision"] for e in events],
                         ["rev+1", "rev+2", "rev+4", "rev+5", "rev+6"])

    def test_watch_prefix_prev_kv(self):
        def scenario(s):
            self.ok(s.ctl("put", s.k("a"), "0"))
            rev = "--rev=%d" % (self.current_revision() + 1)     # from the next write on
            w = self.background(s, "watch", "-w", "json", rev, "--prefix", "--prev-kv", s.k())
            # the same events, text output, watching the range [P, Pz)
            t = self.background(s, "watch", rev, "--prev-kv", s.k(), s.k("z"))
            self.ok(s.ctl("put", s.k("a"), "1"))
            self.ok(s.ctl("put", s.k("b"), "2"))
            self.ok(s.ctl("txn", input="\nput %s 3\nput %s 4\ndel %s\n\n\n"
                          % (s.k("c"), s.k("d"), s.k("a"))))
            self.ok(s.ctl("del", "--prefix", s.k()))
            self.ok(s.ctl("put", s.k("a-later"), "x"))
            self.ok(s.ctl("put", s.prefix[:-1] + "x", "not in the prefix"))
            w.wait_for(count_events(9), 10)
            t.wait_for(lambda lines: sum(1 for l in lines if l in ("PUT", "DELETE")) >= 9, 10)
            time.sleep(0.2)
            w.stop()
            text = t.stop()
            check_txn_grouping(self, w.lines)
            return [watch_events(w.lines), text]
        events, text = self.compare(scenario)
        self.assertEqual([(e["type"], e["kv"]["key"], (e.get("prev_kv") or {}).get("value"))
                          for e in events],
                         [("PUT", "<P>/a", "0"), ("PUT", "<P>/b", None), ("PUT", "<P>/c", None),
                          ("PUT", "<P>/d", None), ("DELETE", "<P>/a", "1"),
                          ("DELETE", "<P>/b", "2"), ("DELETE", "<P>/c", "3"),
                          ("DELETE", "<P>/d", "4"), ("PUT", "<P>/a-later", None)])
        self.assertEqual([e["kv"]["mod_revision"] for e in events],
                         ["rev+2", "rev+3", "rev+4", "rev+4", "rev+4", "rev+5", "rev+5", "rev+5",
                          "rev+6"])
        self.assertTrue(text.startswith("PUT\n<P>/a\n0\n<P>/a\n1\nPUT\n<P>/b\n2\n"), text)

    def test_watch_rev(self):
        """A watch from a past revision replays history, then goes on live."""
        def scenario(s):
            k = s.k("k")
            first = header_revision(self.ok(s.ctl("put", k, "1", "-w", "json")))
            for v in "234":
                self.ok(s.ctl("put", k, v))
            self.ok(s.ctl("del", k))
            t = self.background(s, "watch", "--rev=%d" % (first + 1), k)
            j = self.background(s, "watch", "--rev=%d" % first, "--prev-kv", "-w", "json", k)
            j.wait_for(count_events(5), 10)
            t.wait_for(lambda lines: len(lines) >= 12, 10)
            self.ok(s.ctl("put", k, "live"))
            j.wait_for(count_events(6), 10)
            t.wait_for(lambda lines: len(lines) >= 15, 10)
            time.sleep(0.2)
            j.stop()
            return [t.stop(), watch_events(j.lines)]
        text, events = self.compare(scenario)
        self.assertEqual(text, "PUT\n<P>/k\n2\nPUT\n<P>/k\n3\nPUT\n<P>/k\n4\nDELETE\n<P>/k\n\n"
                         "PUT\n<P>/k\nlive\n")
        self.assertEqual([e["kv"]["mod_revision"] for e in events],
                         ["rev+1", "rev+2", "rev+3", "rev+4", "rev+5", "rev+6"])
        self.assertEqual(events[1]["prev_kv"]["value"], "1")

    def test_watch_many_watchers(self):
        """Several live watchers on one key and on its prefix at once (the
        proxy may coalesce them), and two watches on one stream (etcdctl watch
        -i): each gets every event once, in order."""
        def scenario(s):
            k = s.k("k")
            ws = [self.background(s, "watch", "-w", "json", "--prefix", s.k()) for _ in range(3)]
            ws.append(self.background(s, "watch", "-w", "json", "--prefix", "--prev-kv", s.k()))
            ws += [self.background(s, "watch", "-w", "json", k) for _ in range(2)]
            inter = self.background(s, "watch", "-i", "-w", "json",
                                    stdin_text="watch %s\nwatch --prefix %s\n" % (k, s.k()))
            base = self.sync_watchers(s, k, ws + [(inter, 2)])
            for v in "123":
                self.ok(s.ctl("put", k, v))
            self.ok(s.ctl("put", s.k("other"), "x"))
            self.ok(s.ctl("del", k))
            real = events_after_sync
            for w in ws[:4]:
                w.wait_for(lambda lines: len(real(lines)) >= 5, 10)
            for w in ws[4:]:
                w.wait_for(lambda lines: len(real(lines)) >= 4, 10)
            inter.wait_for(lambda lines: len(events_after_sync(lines, 2)) >= 9, 10)
            time.sleep(0.3)
            result = []
            n = Normalizer(s, base)
            for w in ws:
                w.stop()
                result.append(Done([n.json(e) for e in real(w.lines)]))
            inter.stop()
            # the two watches' responses interleave in no set order
            ievents = [n.json(e) for e in events_after_sync(inter.lines, 2)]
            result.append(Done(sorted(ievents, key=lambda e: (e["kv"]["mod_revision"],
                                                             json.dumps(e, sort_keys=True)))))
            return result
        r = self.compare(scenario)
        prefix_events = [("PUT", "<P>/k", "1"), ("PUT", "<P>/k", "2"), ("PUT", "<P>/k", "3"),
                         ("PUT", "<P>/other", "x"), ("DELETE", "<P>/k", None)]
        for i, events in enumerate(r[:6]):
            expect = prefix_events if i < 4 else prefix_events[:3] + prefix_events[4:]
            self.assertEqual([(e["type"], e["kv"]["key"], e["kv"].get("value")) for e in events],
                             expect)
            self.assertEqual([e["kv"]["mod_revision"] for e in events],
                             ["rev+1", "rev+2", "rev+3", "rev+4", "rev+5"][:len(expect)]
                             if i < 4 else ["rev+1", "rev+2", "rev+3", "rev+5"])
        self.assertNotIn("prev_kv", r[3][0])
        self.assertEqual(r[3][1]["prev_kv"]["value"], "1")
        self.assertEqual([(e["type"], e["kv"]["key"], e["kv"].get("value")) for e in r[6]],
                         [x for x in prefix_events for _ in range(1 if "other" in x[1] else 2)])

    def test_watch_progress(self):
        """etcdctl watch -i "progress" (WatchProgressRequest)."""
        def scenario(s):
            self.ok(s.ctl("put", s.k("k"), "1"))
            w = self.background(s, "watch", "-i", stdin_text="watch %s\n" % s.k("k"))
            notified = lambda: any("progress notify" in l for l in w.lines)
            deadline = time.monotonic() + 5
            while not notified() and time.monotonic() < deadline:
                w.write("progress\n")
                time.sleep(0.3)
            self.assertTrue(notified(), "%s: no progress notification after 5s: %s %s"
                            % (s.name, w.lines, w.stderr))
            return sorted(set(w.stop().splitlines()))
        r = self.compare(scenario)
        self.assertEqual(r, ["progress notify: rev+1"])


class LeaseTests(EtcdctlTestCase):

    def grant(self, s, ttl):
        cp = self.ok(s.ctl("lease", "grant", str(ttl), "-w", "json"))
        obj = json_lines(cp.stdout)[0]
        return cp, obj["ID"], "%016x" % obj["ID"]

    def test_lease_lifecycle(self):
        def scenario(s):
            gcp, lid, hexid = self.grant(s, 60)
            out = [gcp, s.ctl("lease", "grant", "100")]
            out.append(s.ctl("put", "--lease=" + hexid, s.k("a"), "1"))
            out.append(s.ctl("put", "--lease=" + hexid, s.k("b"), "2"))
            ttl = self.ok(s.ctl("lease", "timetolive", hexid, "-w", "json"))
            remaining = json_lines(ttl.stdout)[0]["ttl"]
            self.assertTrue(55 <= remaining <= 60, "%s: remaining TTL %s of 60" % (s.name, remaining))
            out += [
                ttl,
                s.ctl("lease", "timetolive", hexid),
                s.ctl("lease", "timetolive", "--keys", hexid),
                s.ctl("lease", "timetolive", "--keys", hexid, "-w", "json"),
                s.ctl("get", "--prefix", s.k(), "-w", "json"),
                s.ctl("lease", "keep-alive", "--once", hexid),
                recent_keep_alive(s.ctl("lease", "keep-alive", "--once", hexid, "-w", "json"), 60),
                s.ctl("lease", "revoke", hexid),
                s.ctl("get", "--prefix", s.k(), "-w", "json"),
                s.ctl("lease", "timetolive", hexid),
                s.ctl("lease", "timetolive", hexid, "-w", "json"),
                s.ctl("lease", "revoke", hexid),
                s.ctl("lease", "keep-alive", "--once", hexid),
                s.ctl("put", "--lease=" + hexid, s.k("c"), "3"),
                s.ctl("lease", "timetolive", "1234"),
            ]
            return out
        r = self.compare(scenario)
        self.assertEqual(r[1]["out"], "lease <id2> granted with TTL(100s)\n")
        self.assertEqual(r[5]["out"], "lease <id1> granted with TTL(60s), remaining(<n>s)\n")
        self.assertEqual(r[6]["out"], "lease <id1> granted with TTL(60s), remaining(<n>s), "
                                      "attached keys([<P>/a <P>/b])\n")
        self.assertEqual(r[7]["out"][0]["keys"], ["<P>/a", "<P>/b"])
        self.assertEqual(r[9]["out"], "lease <id1> keepalived with TTL(60)\n")
        self.assertEqual(r[10]["out"][0]["TTL"], "<59..60>")
        self.assertEqual(r[11]["out"], "lease <id1> revoked\n")
        self.assertNotIn("kvs", r[12]["out"][0])
        self.assertEqual(r[12]["out"][0].get("count", 0), 0)
        self.assertEqual(r[13]["out"], "lease <id1> already expired\n")
        self.assertEqual(r[15]["err"], ["Error: failed to revoke lease (etcdserver: requested lease not found)"])
        self.assertEqual(r[16]["err"], ["Error: etcdserver: requested lease not found"])
        self.assertEqual(r[17]["err"], ["Error: etcdserver: requested lease not found"])

    def test_lease_list(self):
        ids = []
        for side in self.sides():
            ids.append(self.grant(side, 120)[1])
            self.addCleanup(etcdctl, self.direct, "lease", "revoke", "%016x" % ids[-1], check=False)
        d = json_lines(self.ok(etcdctl(self.direct, "lease", "list", "-w", "json")).stdout)[0]
        p = json_lines(self.ok(etcdctl(self.proxied, "lease", "list", "-w", "json")).stdout)[0]
        dl = sorted(x["id"] for x in d["leases"])
        pl = sorted(x["id"] for x in p["leases"])
        self.assertEqual(dl, pl)
        for i in ids:
            self.assertIn(i, pl)
        self.assertEqual((d["cluster_id"], d["member_id"]), (p["cluster_id"], p["member_id"]))
        text = self.ok(etcdctl(self.proxied, "lease", "list")).stdout.splitlines()
        self.assertEqual(text[0], "found %d leases" % len(dl))
        self.assertEqual(sorted(int(x, 16) for x in text[1:]), dl)

    def test_lease_keep_alive_stream(self):
        """A streaming keep-alive (TTL 2: etcdctl sends every ~0.7 s) for
        ~2.6 s, on both sides at once; then the leases must expire on time."""
        ttl = 2
        procs = []
        for s in self.sides():
            _, lid, hexid = self.grant(s, ttl)
            self.ok(s.ctl("put", "--lease=" + hexid, s.k("alive"), "1"))
            procs.append((s, hexid, self.background(s, "lease", "keep-alive", hexid)))
        time.sleep(2.6)
        outs = {}
        for s, hexid, p in procs:
            self.assertTrue(p.running(), "%s: keep-alive exited: %s %s" % (s.name, p.output(), p.stderr))
            r = self.ok(s.ctl("lease", "timetolive", hexid, "-w", "json"))
            remaining = json_lines(r.stdout)[0]["ttl"]
            self.assertTrue(1 <= remaining <= ttl, "%s: remaining %s" % (s.name, remaining))
            outs[s.name] = [l for l in p.lines]
        for s, hexid, p in procs:
            p.stop(signal.SIGKILL)
        stopped = time.monotonic()
        for name, lines in outs.items():
            hexid = [h for s, h, _ in procs if s.name == name][0]
            self.assertTrue(lines, "%s: no keep-alive answer" % name)
            self.assertEqual(set(lines), {"lease %s keepalived with TTL(%d)" % (hexid, ttl)},
                             "%s: %s" % (name, lines))
        self.assertLessEqual(abs(len(outs["direct"]) - len(outs["proxy"])), 1, outs)
        self.assertGreaterEqual(len(outs["proxy"]), 2, outs)
        # once its keep-alive stops, a lease expires about TTL later
        expired_after = {}
        deadline = stopped + ttl + 4
        while len(expired_after) < 2 and time.monotonic() < deadline:
            for s, hexid, _ in procs:
                if s.name in expired_after:
                    continue
                got = etcdctl(self.direct, "get", s.k("alive"), "--print-value-only").stdout
                if got == "":
                    expired_after[s.name] = time.monotonic() - stopped
            time.sleep(0.1)
        self.assertEqual(sorted(expired_after), ["direct", "proxy"],
                         "leases still alive %.1fs after their keep-alive stopped: %s"
                         % (ttl + 4, expired_after))
        self.assertLess(expired_after["proxy"], ttl + 1.5, expired_after)

    def test_keep_alive_of_revoked_lease(self):
        def scenario(s):
            _, lid, hexid = self.grant(s, 30)
            self.ok(s.ctl("lease", "revoke", hexid))
            return [s.ctl("lease", "keep-alive", hexid, timeout=10)]
        (r,) = self.compare(scenario)
        self.assertEqual(r["out"], "lease <id1> expired or revoked.\n")


class MaintenanceTests(EtcdctlTestCase):

    def json_of(self, ep, *args):
        return json_lines(self.ok(etcdctl(ep, *args, "-w", "json")).stdout)[0]

    def test_member_list(self):
        # etcd's members, each started member's client URLs this proxy's own
        # address, so that clients syncing their endpoints stay on it.
        d = self.json_of(self.direct, "member", "list")
        p = self.json_of(self.proxied, "member", "list")
        self.assertEqual(len(d["members"]), 1)
        for member in d["members"]:
            member["clientURLs"] = [self.proxied]
        self.assertEqual(p, d)
        self.assertEqual(etcdctl(self.proxied, "member", "list").stdout,
                         etcdctl(self.direct, "member", "list").stdout.replace(
                             "http://" + self.direct, self.proxied))

    def test_endpoint_status(self):
        before = self.json_of(self.direct, "endpoint", "status")[0]["Status"]
        proxied = self.json_of(self.proxied, "endpoint", "status")
        after = self.json_of(self.direct, "endpoint", "status")[0]["Status"]
        self.assertEqual(len(proxied), 1)
        self.assertEqual(proxied[0]["Endpoint"], self.proxied)
        p = proxied[0]["Status"]
        for f in ("version", "leader", "raftTerm", "dbSize", "dbSizeInUse"):
            self.assertEqual(p.get(f), before.get(f), f)
        for f in ("cluster_id", "member_id", "raft_term"):
            self.assertEqual(p["header"].get(f), before["header"].get(f), f)
        for f in ("raftIndex", "raftAppliedIndex"):
            self.assertTrue(before[f] <= p[f] <= after[f], (f, before, p, after))
        self.assertTrue(before["header"]["revision"] <= p["header"]["revision"]
                        <= after["header"]["revision"])
        self.assertNotIn("errors", p)
        self.assertFalse(p.get("isLearner", False))
        text = self.ok(etcdctl(self.proxied, "endpoint", "status")).stdout
        self.assertTrue(text.startswith(self.proxied + ", %x, %s, " % (before["header"]["member_id"],
                                                                       before["version"])), text)

    def test_endpoint_hashkv(self):
        self.ok(etcdctl(self.direct, "put", "hashkv/k", "v"))
        d1 = self.json_of(self.direct, "endpoint", "hashkv")[0]["HashKV"]
        p = self.json_of(self.proxied, "endpoint", "hashkv")[0]["HashKV"]
        d2 = self.json_of(self.direct, "endpoint", "hashkv")[0]["HashKV"]
        self.assertEqual(d1, d2)
        self.assertEqual(p, d1)
        rev = d1["header"]["revision"] - 1
        self.assertEqual(self.json_of(self.proxied, "endpoint", "hashkv", "--rev=%d" % rev)[0]["HashKV"],
                         self.json_of(self.direct, "endpoint", "hashkv", "--rev=%d" % rev)[0]["HashKV"])
        self.assertEqual(etcdctl(self.proxied, "endpoint", "hashkv").stdout,
                         "%s, %d\n" % (self.proxied, d1["hash"]))

    def test_endpoint_health(self):
        def scenario(s):
            return [s.ctl("endpoint", "health"),      # prints to stderr
                    s.ctl("endpoint", "health", "-w", "json")]
        r = self.compare(scenario)
        # etcdctl 3.4 prints it to stderr, 3.5 to stdout
        self.assertEqual(r[0]["err"] or r[0]["out"].splitlines(),
                         ["<EP> is healthy: successfully committed proposal: took = <t>"])
        self.assertEqual(r[1]["out"], [[{"endpoint": "<EP>", "health": True, "took": "<t>"}]])

    def test_alarm(self):
        def scenario(s):
            return [s.ctl("alarm", "list"), s.ctl("alarm", "list", "-w", "json"),
                    s.ctl("alarm", "disarm")]
        r = self.compare(scenario)
        self.assertEqual([x["rc"] for x in r], [0, 0, 0])
        self.assertEqual(r[0]["out"], "")

    def test_defrag(self):
        def scenario(s):
            for i in range(20):
                self.ok(s.ctl("put", s.k("x"), "v" * 2000))
            return [s.ctl("defrag", timeout=30)]
        (r,) = self.compare(scenario)
        self.assertEqual(r["out"], "Finished defragmenting etcd member[<EP>]\n")

    def test_snapshot(self):
        tmp = tempfile.mkdtemp(prefix="etcdproxy-test-snap-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.ok(etcdctl(self.direct, "put", "snap/k", "v"))
        files, outs = {}, {}
        for side in self.sides():
            path = os.path.join(tmp, side.name + ".db")
            cp = self.ok(side.ctl("snapshot", "save", path, timeout=30))
            outs[side.name] = cp.stdout.replace(path, "<FILE>")
            files[side.name] = path
        self.assertEqual(outs["direct"], "Snapshot saved at <FILE>\n")
        self.assertEqual(outs["proxy"], outs["direct"])
        status = {name: json_lines(self.ok(etcdctl(self.direct, "snapshot", "status", path,
                                                   "-w", "json")).stdout)[0]
                  for name, path in files.items()}
        self.assertEqual(status["proxy"], status["direct"])
        self.assertEqual(status["direct"]["revision"], self.current_revision())
        self.assertGreater(status["direct"]["totalKey"], 0)
        self.assertEqual(os.path.getsize(files["proxy"]), os.path.getsize(files["direct"]))


class ConcurrencyTests(EtcdctlTestCase):

    def test_elect(self):
        def scenario(s):
            name = s.k("election")
            obs = self.background(s, "elect", "-l", name)
            a = self.background(s, "elect", name, "propA")
            a.wait_for(lambda lines: "propA" in lines, 10, what="A elected")
            obs.wait_for(lambda lines: "propA" in lines, 10, what="observer sees A")
            b = self.background(s, "elect", name, "propB")
            time.sleep(0.8)
            self.assertEqual(b.lines, [], "%s: B elected while A leads" % s.name)
            a_out = a.stop(signal.SIGINT)
            b.wait_for(lambda lines: "propB" in lines, 10, what="B elected after A resigned")
            obs.wait_for(lambda lines: "propB" in lines, 10, what="observer sees B")
            b_out = b.stop(signal.SIGINT)
            time.sleep(0.3)
            leader = s.ctl("get", "--prefix", name, "--keys-only")
            return [a_out, b_out, obs.stop(), leader]
        r = self.compare(scenario)
        self.assertEqual(r[0], "<P>/election/<id1>\npropA\n")
        self.assertEqual(r[1], "<P>/election/<id2>\npropB\n")
        self.assertEqual(r[2], "<P>/election/<id1>\npropA\n<P>/election/<id2>\npropB\n")
        self.assertEqual(r[3]["out"], "")

    def test_lock(self):
        def scenario(s):
            name = s.k("lock")
            a = self.background(s, "lock", name)
            a.wait_for(lambda lines: len(lines) >= 1, 10, what="lock acquired by A")
            b = self.background(s, "lock", name, "echo", "B got it")
            time.sleep(0.8)
            self.assertTrue(b.running(), "%s: B did not wait for the lock: %s" % (s.name, b.output()))
            self.assertEqual(b.lines, [])
            holders = s.ctl("get", "--prefix", name, "--keys-only", "--sort-by=CREATE")
            a_out = a.stop(signal.SIGINT)
            rc = b.wait_exit(10)
            return [a_out, holders, b.output(), rc,
                    s.ctl("get", "--prefix", name, "--keys-only")]
        r = self.compare(scenario)
        self.assertEqual(r[0], "<P>/lock/<id1>\n\n")
        self.assertEqual(r[1]["out"], "<P>/lock/<id1>\n\n<P>/lock/<id2>\n\n")
        self.assertEqual(r[2], "B got it\n")
        self.assertEqual(r[3], 0)
        self.assertEqual(r[4]["out"], "")


class AuthTests(EtcdctlTestCase):
    """Users, roles, auth enable and authenticated requests (own etcd)."""

    ROOT = "root:rootpw"

    def test_auth(self):
        sides = self.sides()
        self.addCleanup(etcdctl, self.direct, "--user", self.ROOT, "auth", "disable", check=False)

        def setup(s):
            user, role = s.name + "-alice", s.name + "-reader"
            return [
                s.ctl("user", "add", user, "--new-user-password=alicepw"),
                s.ctl("user", "add", user, "--new-user-password=alicepw"),
                s.ctl("role", "add", role),
                s.ctl("role", "grant-permission", role, "read", "--prefix", s.k()),
                s.ctl("role", "grant-permission", role, "readwrite", s.k("rw")),
                s.ctl("user", "grant-role", user, role),
                s.ctl("user", "get", user),
                s.ctl("user", "get", user, "-w", "json"),
                s.ctl("role", "get", role),
                s.ctl("role", "get", role, "-w", "json"),
                s.ctl("role", "get", s.name + "-nope"),
            ]
        res = self.run_both(setup, sides)
        self.assertSame(*res, msg="user/role setup:")
        self.assertEqual(res[0][1]["err"], ["Error: etcdserver: user name already exists"])
        self.assertEqual(res[0][6]["out"], "User: <S>-alice\nRoles: <S>-reader\n")

        p, d = self.proxied, self.direct
        self.assertEqual(self.ok(etcdctl(p, "user", "add", "root", "--new-user-password=rootpw")).stdout,
                         "User root created\n")
        self.assertEqual(etcdctl(p, "user", "list").stdout, etcdctl(d, "user", "list").stdout)
        self.assertEqual(etcdctl(p, "role", "list").stdout, etcdctl(d, "role", "list").stdout)
        self.assertEqual(self.ok(etcdctl(p, "auth", "enable")).stdout, "Authentication Enabled\n")
        self.auth_args = ("--user=" + self.ROOT,)

        alice = lambda s: "--user=%s-alice:alicepw" % s.name

        def authed(s):
            root = "--user=" + self.ROOT
            return [
                s.ctl(root, "put", s.k("r"), "readable"),
                s.ctl("get", s.k("r")),                                   # no user
                s.ctl("put", s.k("x"), "1"),
                s.ctl(root, "put", s.k("x"), "1"),
                s.ctl(root, "get", "--prefix", s.k(), "-w", "json"),
                s.ctl(alice(s), "get", s.k("r")),
                s.ctl(alice(s), "get", "--prefix", s.k(), "--consistency=s"),
                s.ctl(alice(s), "put", s.k("r"), "nope"),                 # read-only
                s.ctl(alice(s), "put", s.k("rw"), "yes"),
                s.ctl(alice(s), "get", s.k("rw")),
                s.ctl(alice(s), "get", "other/" + s.k()),                  # not granted
                s.ctl(alice(s), "get", "--prefix", s.prefix[:-1]),         # wider than granted
                s.ctl("--user=%s-alice:wrong" % s.name, "get", s.k("r")),
                s.ctl("--user=nobody:x", "get", s.k("r")),
                s.ctl(alice(s), "user", "list"),
                s.ctl(alice(s), "lease", "grant", "10"),
            ]
        res = self.run_both(authed, sides)
        self.assertSame(*res, msg="with auth enabled:")
        r = res[0][1:]
        self.assertEqual(r[0]["err"], ["Error: etcdserver: user name is empty"])
        self.assertEqual(r[3]["out"][0]["count"], 2)
        self.assertEqual(r[4]["out"], "<P>/r\nreadable\n")
        self.assertEqual(r[6]["err"], ["Error: etcdserver: permission denied"])
        self.assertEqual(r[6]["codes"], ["PermissionDenied"])
        self.assertEqual(r[8]["out"], "<P>/rw\nyes\n")
        self.assertEqual(r[9]["err"], ["Error: etcdserver: permission denied"])
        self.assertEqual(r[11]["err"], ["Error: etcdserver: authentication failed, invalid user ID or password"])

        # watches carry the token too
        def watches(s):
            allowed = self.background(s, "--user=%s-alice:alicepw" % s.name, "watch",
                                      "--prefix", s.k(), "--rev=1")
            allowed.wait_for(lambda lines: len(lines) >= 9, 10, what="replayed events")
            denied = s.ctl("--user=%s-alice:alicepw" % s.name, "watch", "other/" + s.k(),
                           timeout=10)
            return [allowed.stop(), denied]
        res = self.run_both(watches, sides)
        self.assertSame(*res, msg="watches with auth:")
        self.assertEqual(res[0][0], "PUT\n<P>/r\nreadable\nPUT\n<P>/x\n1\nPUT\n<P>/rw\nyes\n")
        self.assertEqual(res[0][1]["err"], ["watch was canceled (rpc error: code = PermissionDenied "
                                            "desc = etcdserver: permission denied)",
                                            "Error: watch is canceled by the server"])

        self.assertEqual(etcdctl(p, "auth", "disable", check=False).stderr.strip().splitlines()[-1:],
                         etcdctl(d, "auth", "disable", check=False).stderr.strip().splitlines()[-1:])
        self.assertEqual(self.ok(etcdctl(p, "--user=" + self.ROOT, "auth", "disable")).stdout,
                         "Authentication Disabled\n")
        self.auth_args = ()
        self.assertEqual(self.ok(etcdctl(p, "get", sides[1].k("r"), "--print-value-only")).stdout,
                         "readable\n")

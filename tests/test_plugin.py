"""The twistd plugin: discovered, documented, refusing bad flags; and the
committed protobuf modules match protos/."""

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.support.proxy import REPO_ROOT

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(TWISTD + list(args), env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


class PluginTests(unittest.TestCase):
    def test_listed_by_twistd(self):
        out = twistd("--help").stdout
        self.assertIn("etcdgrpcproxy", out)

    def test_help_describes_every_flag(self):
        out = " ".join(twistd("etcdgrpcproxy", "--help").stdout.split())
        for flag in ["--endpoints", "--listen-addr", "--max-recv-bytes", "--max-send-bytes",
                     "--max-concurrent-streams", "--upstream-keepalive-interval",
                     "--upstream-keepalive-timeout", "--drain-timeout", "--endpoint-policy",
                     "--upstream-connect-timeout", "--health-check-interval",
                     "--health-check-timeout", "--endpoint-probe-max-interval", "--cert-file",
                     "--key-file", "--trusted-ca-file", "--client-crl-file", "--auto-tls",
                     "--listen-cipher-suites", "--tls-min-version", "--tls-max-version",
                     "--cacert", "--cert", "--key", "--insecure-skip-tls-verify",
                     "--watch-exact", "--watch-send-buffer", "--watch-fragment-size",
                     "--metrics-addr", "--debug", "--namespace", "--resolver-prefix",
                     "--resolver-ttl", "--advertise-client-url", "--discovery-srv",
                     "--discovery-srv-name", "--insecure-discovery", "--enable-pprof",
                     "--experimental-serializable-ordering", "--experimental-leasing-prefix",
                     "--data-dir", "--max-connections", "--handshake-timeout", "--endpoints-file"]:
            self.assertIn(flag, out)
        self.assertIn("[default: 127.0.0.1:2379]", out)
        self.assertIn("[default: 127.0.0.1:23790]", out)

    def test_bad_flags_stop_start_up_with_a_message(self):
        for args, message in [
            (["--endpoints=ftp://x:1"], "scheme must be http or https"),
            (["--endpoints=127.0.0.1:notaport"], "invalid port"),
            (["--cert-file=/nonexistent.pem", "--key-file=/nonexistent.pem"], "No such file"),
            (["--cert-file=/etc/hostname"], "--cert-file and --key-file go together"),
            (["--trusted-ca-file=/etc/hostname"], "need --cert-file or --auto-tls"),
            (["--tls-min-version=SSL3"], "must be one of TLS1.0"),
            (["--auto-tls", "--data-dir=/tmp/etcdproxy-test-autotls",
              "--listen-cipher-suites=TLS_NOPE"], "unknown cipher suite"),
            (["--watch-send-buffer=0"], "must be positive"),
            (["--resolver-ttl=0"], "resolver-ttl must be positive"),
            (["--max-connections=-1"], "--max-connections must be 0"),
            (["--handshake-timeout=0"], "--handshake-timeout must be positive"),
            (["--discovery-srv=example.com"], "--discovery-srv is not implemented yet"),
            (["--experimental-serializable-ordering"], "not implemented yet"),
            (["--enable-pprof"], "not available"),
            (["--metrics-addr=https://127.0.0.1:1"], "https is not implemented yet"),
            (["--listen-addr=nowhere"], "expected host:port"),
            (["--max-recv-bytes=0"], "max-recv-bytes"),
            (["--upstream-keepalive-interval=1"], "at least 5"),
            (["--endpoint-policy=random"], "must be one of sticky, round-robin, weighted"),
            (["--endpoints=127.0.0.1:1=2,127.0.0.1:2"], "need --endpoint-policy=weighted"),
            (["--endpoint-policy=weighted", "--endpoints=127.0.0.1:1=0"], "positive integer"),
            (["--endpoints=127.0.0.1:1,127.0.0.1:1"], "given twice"),
            (["--health-check-timeout=0"], "must be positive"),
        ]:
            result = twistd("-n", "--pidfile=", "etcdgrpcproxy", *args)
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(message, result.stdout + result.stderr, args)


class GeneratedProtosTests(unittest.TestCase):
    def test_committed_modules_match_protos(self):
        """scripts/generate-protos run on a copy gives the committed files."""
        if shutil.which("protoc") is None:
            self.fail("protoc missing: scripts/ensure-deps installs protobuf-compiler")
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work)
        for name in ["scripts", "protos", "etcdproxy"]:
            shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(work, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["sh", os.path.join(work, "scripts", "generate-protos")],
                       check=True, capture_output=True, timeout=60)
        committed = os.path.join(REPO_ROOT, "etcdproxy", "pb")
        regenerated = os.path.join(work, "etcdproxy", "pb")
        for package in sorted(os.listdir(os.path.join(REPO_ROOT, "protos"))):
            names = sorted(n for n in os.listdir(os.path.join(committed, package)) if n.endswith(".py"))
            self.assertTrue(names, package)
            match, mismatch, errors = filecmp.cmpfiles(
                os.path.join(committed, package), os.path.join(regenerated, package), names, shallow=False)
            self.assertEqual((mismatch, errors), ([], []), package)

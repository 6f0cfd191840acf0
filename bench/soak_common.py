"""What the soak's modules (bench/soak.py, soak_load.py, soak_checks.py)
share: bench/run.py's helpers, loaded once, and the soak's own error.
bench/soak.py imports it (and the other two) after its interpreter check and
its sys.path set-up."""
import importlib.util
import os


def _load_bench_run():
    """bench/run.py as a module (its etcd runner and /proc helpers)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    spec = importlib.util.spec_from_file_location("etcdproxy_bench_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench_run()
say = bench.say


class SoakError(Exception):
    """The soak could not run (set-up failed, the proxy died)."""

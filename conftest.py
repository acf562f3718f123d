# Tests run on CPU: the Triton kernels run under the interpreter, which must be switched on before triton is
# imported anywhere, so it is set here, at the very start of the pytest session. NANOTULU_TEST_DEVICE=cuda (for
# tests/test_kernels.py on a GPU) leaves it off, so that the kernels are compiled for real.
import atexit
import os
import shutil
import sys
import tempfile

if os.environ.get("NANOTULU_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# With the fault handler on, every subprocess the tests start prints its Python stack when a signal kills it, and
# tests/multirank.py makes a hung rank print it that way (which is how the hang at the end of 2-rank runs was found).
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# torch.compile's on-disk kernel cache does not tell CPU kernel widths apart: kernels compiled by an earlier run under
# another ATEN_CPU_CAPABILITY (the demo pins AVX2) crashed the tests that loaded them with a segfault (torch 2.13), so
# the tests, and the trainers they start, compile into a cache of their own, fresh every session.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanotulu_test_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

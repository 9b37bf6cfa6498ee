"""The CLI's allocator policy: freed large blocks stay in the heap for reuse (glibc), and a
user's own malloc settings are left alone."""

import ctypes
import sys

from clipvqd.allocator import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_user_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert keep_freed_memory() is False


def test_a_freed_large_block_stays_in_the_heap(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    if libc is None or not hasattr(libc, "mallinfo2"):  # not glibc >= 2.33: nothing to set or to see
        assert keep_freed_memory() is (libc is not None and hasattr(libc, "mallopt"))
        return
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 96 << 20  # above glibc's largest automatic mmap threshold (32 MiB)
    assert keep_freed_memory() is True
    block = libc.malloc(size)
    assert block
    assert libc.mallinfo2().hblkhd < size  # not a separate mapping: taken from the heap
    libc.free(block)
    assert libc.mallinfo2().fordblks >= size  # and kept there, free for the next tensor

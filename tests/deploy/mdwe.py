"""`python mdwe.py COMMAND...`: run COMMAND under the seccomp rule of systemd's
MemoryDenyWriteExecute=yes (x86_64), so a test can show the server tolerates it without systemd.

Like systemd, it refuses with EPERM: mmap() of memory both writable and executable, mprotect() and
pkey_mprotect() adding PROT_EXEC, and shmat() with SHM_EXEC. The filter is inherited by every child.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
AUDIT_ARCH_X86_64 = 0xC000003E
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1
LD_W_ABS, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
MMAP, MPROTECT, SHMAT, PKEY_MPROTECT = 9, 10, 30, 329
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
#: Exit status when the filter cannot be installed here (the caller skips).
CANNOT = 77
ARG2 = 16 + 2 * 8  # offsetof(struct seccomp_data, args[2]), its low 32 bits on little-endian

#: (label:op, jump-if-true label, jump-if-false label, k)
PROGRAM = [
    ("ld", None, None, 4), ("jeq", "nr", "allow", AUDIT_ARCH_X86_64),
    ("nr:ld", None, None, 0),
    ("jeq", "mmap", None, MMAP), ("jeq", "mprotect", None, MPROTECT), ("jeq", "mprotect", None, PKEY_MPROTECT),
    ("jeq", "shmat", "allow", SHMAT),
    ("mmap:ld", None, None, ARG2), ("and", None, None, PROT_WRITE | PROT_EXEC),
    ("jeq", "deny", "allow", PROT_WRITE | PROT_EXEC),
    ("mprotect:ld", None, None, ARG2), ("and", None, None, PROT_EXEC), ("jeq", "deny", "allow", PROT_EXEC),
    ("shmat:ld", None, None, ARG2), ("and", None, None, SHM_EXEC), ("jeq", "deny", "allow", SHM_EXEC),
    ("allow:ret", None, None, RET_ALLOW), ("deny:ret", None, None, RET_EPERM),
]


def assemble() -> bytes:
    labels = {name.split(":")[0]: i for i, (name, *_) in enumerate(PROGRAM) if ":" in name}
    codes = {"ld": LD_W_ABS, "jeq": JEQ_K, "and": AND_K, "ret": RET_K}
    out = b""
    for i, (name, jt, jf, k) in enumerate(PROGRAM):
        def rel(label: str | None) -> int:
            return 0 if label is None else labels[label] - i - 1
        out += struct.pack("HBBI", codes[name.split(":")[-1]], rel(jt), rel(jf), k)
    return out


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install() -> None:
    if platform.machine() != "x86_64":
        print("mdwe.py: x86_64 only", file=sys.stderr)
        sys.exit(CANNOT)
    raw = assemble()
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _Fprog(len(raw) // 8, ctypes.cast(buf, ctypes.c_char_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                                                                  ctypes.byref(prog), 0, 0):
        print(f"mdwe.py: seccomp unavailable: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        sys.exit(CANNOT)
    try:  # the rule is in force
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        return
    sys.exit("mdwe.py: writable+executable memory is still allowed")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])

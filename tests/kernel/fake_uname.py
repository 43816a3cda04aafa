"""Run the ebpf-tproxy CLI as if uname -r said RELEASE (no kernel below 5.7 can be booted
here): python fake_uname.py RELEASE ARGS... Only the release string is faked; every other
check and every kernel operation is real."""
import os
import platform
import sys

release = sys.argv.pop(1)
real = os.uname()
os.uname = lambda: os.uname_result((real.sysname, real.nodename, release, real.version,
                                    real.machine))
platform.release = lambda: release

from loader.cli import main  # noqa: E402

main(prog_name="ebpf-tproxy")

"""The Vagrantfile is a real lab: `vagrant validate` passes (whenever vagrant is installed;
make kernels installs it, so CI always runs this), and it has a VM for each kernel line."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANTFILE = os.path.join(ROOT, "Vagrantfile")


@pytest.mark.skipif(not shutil.which("vagrant"),
                    reason="vagrant is not installed (make kernels installs it)")
def test_vagrant_validate(tmp_path):
    # Its state and plugin directories go to tmp_path, not to ~/.vagrant.d or .vagrant/.
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1")
    # --ignore-provider: neither VirtualBox nor libvirt is on a CI machine
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_one_vm_per_kernel_line():
    text = open(VAGRANTFILE).read()
    vms = {name: job for name, _box, job in
           re.findall(r'^\s+"(\w+)"\s+=> \[(.+), :(\w+)\]', text, re.M)}
    assert vms == {"ubuntu2004": "refuse", "ubuntu2204": "test", "debian12": "test",
                   "fedora": "test"}, vms
    assert ":refuse" in text and "need Linux 5.7 or newer" in text
    # The refusal must come from the kernel check, not from a missing kuma-dp user.
    assert "ebpf-tproxy install --kuma-dp-user 0" in text

#!/usr/bin/env python3
"""Parse the enroll-agent recipe with the real BitBake parser (the `bb` library of the PyPI
package bitbake-setup), offline, with empty stub classes for base/cargo/systemd/useradd/...

This checks recipe syntax, includes, inline Python and the variables the recipe computes for
each PACKAGECONFIG; it is not a build (the stub classes do nothing: DEPENDS from PACKAGECONFIG,
the cargo fetch and compile are not exercised). Run with the Python of a venv holding
bitbake-setup (yocto/check.sh does that).
"""

import os
import sys
import tempfile
import types

recipe = os.path.abspath(sys.argv[1])

# bb.siggen imports hashserv, which bitbake-setup does not ship; parsing never uses it.
hashserv = types.ModuleType("hashserv")
hashserv.client = types.ModuleType("hashserv.client")
sys.modules["hashserv"] = hashserv
sys.modules["hashserv.client"] = hashserv.client

import bb  # noqa: E402
import bb.data  # noqa: E402
import bb.parse  # noqa: E402
import bb.siggen  # noqa: E402
import bb.utils  # noqa: E402

stubs = tempfile.mkdtemp(prefix="enroll-bbparse-")
os.makedirs(os.path.join(stubs, "classes"))
for cls in ("base", "cargo", "pkgconfig", "systemd", "useradd", "features_check"):
    with open(os.path.join(stubs, "classes", cls + ".bbclass"), "w") as f:
        f.write("# stub\n")

PATHS = dict(WORKDIR="/work", sysconfdir="/etc", localstatedir="/var", bindir="/usr/bin",
             base_sbindir="/sbin", nonarch_libdir="/usr/lib", docdir="/usr/share/doc",
             systemd_system_unitdir="/usr/lib/systemd/system", D="/image",
             CARGO_BUILD_FLAGS="-v --frozen --target T --release --manifest-path=M")


def parse(packageconfig):
    d = bb.data.init()
    d.setVar("BBPATH", stubs)
    d.setVar("TOPDIR", stubs)
    d.setVar("__bbclasstype", "recipe")
    for key, value in PATHS.items():
        d.setVar(key, value)
    d.setVar("FILE", recipe)
    d.setVar("PN", "${@bb.parse.vars_from_file(d.getVar('FILE', False), d)[0]}")
    d.setVar("PV", "${@bb.parse.vars_from_file(d.getVar('FILE', False), d)[1]}")
    d.setVar("BPN", "${PN}")
    if packageconfig is not None:
        d.setVar("PACKAGECONFIG", packageconfig)
    bb.parse.siggen = bb.siggen.init(d)
    return bb.parse.handle(recipe, d)[""]


failures = []


def expect(cond, what):
    print(("  ok: " if cond else "  FAIL: ") + what)
    if not cond:
        failures.append(what)


ALL = "enos ezca sectigo securosys est acme scep redtrust"
for pc, features, unit in (("", [], "enroll-agent.service"),
                           (ALL, [f"--features={f}" for f in ALL.split()], "enroll-agent.service"),
                           ("est", ["--features=est"], "enroll-agent.service"),
                           ("acme acme-tls-alpn", ["--features=acme", "--features=acme-tls-alpn"],
                            "enroll-agent.service"),
                           ("sectigo redtrust", ["--features=sectigo", "--features=redtrust"],
                            "enroll-agent.service"),
                           ("pkcs11", ["--features=pkcs11"], "enroll-agent.service"),
                           ("est pkcs11 tpm", ["--features=est", "--features=pkcs11", "--features=tpm"],
                            "enroll-agent.service"),
                           ("timer", [], "enroll-agent-renew.timer")):
    d = parse(pc)
    pn = d.getVar("PN")
    print(f"PACKAGECONFIG = {pc!r}")
    flags = d.getVar("CARGO_BUILD_FLAGS").split()
    # bb.utils.filter sorts the names; the order of --features does not matter to cargo.
    expect(sorted(f for f in flags if f.startswith("--features")) == sorted(features) and "--bin" in flags
           and "--no-default-features" in flags,
           f"CARGO_BUILD_FLAGS = {' '.join(flags)!r}")
    expect(d.getVar("CARGO_SRC_DIR") == "agent", f"CARGO_SRC_DIR = {d.getVar('CARGO_SRC_DIR')!r}")
    expect(d.getVar(f"SYSTEMD_SERVICE:{pn}") == unit, f"SYSTEMD_SERVICE:{pn} = {d.getVar(f'SYSTEMD_SERVICE:{pn}')!r}")
    install = (d.getVar("do_install") or "") + (d.getVar("do_install:append") or "")
    expect("10-tpm.conf" in install and ("if true;" in install) == ("tpm" in pc.split()),
           "TPM drop-ins installed" if "tpm" in pc.split() else "no TPM drop-ins")
    src = d.getVar("SRC_URI").split()
    crates = [u for u in src if u.startswith("crate://")]
    sums = [k for k in (d.getVarFlags("SRC_URI") or {}) if k.endswith(".sha256sum")]
    expect(src[0].startswith("git://") and len(crates) == len(sums) > 0,
           f"SRC_URI: first {src[0].split(';')[0]}, {len(crates)} crates, {len(sums)} sha256sums")
    expect(d.getVar("S") == "/work/git", f"S = {d.getVar('S')!r}")

default = parse(None).getVar("PACKAGECONFIG")
print("PACKAGECONFIG unset")
expect(default == ALL, f"the recipe's default PACKAGECONFIG = {default!r} (every protocol and redtrust)")

print("bb-parse: " + ("FAILED" if failures else "ok"))
sys.exit(1 if failures else 0)

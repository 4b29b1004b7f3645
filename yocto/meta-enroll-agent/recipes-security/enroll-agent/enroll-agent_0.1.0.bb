SUMMARY = "Device X.509 identity: enrollment and automatic renewal"
DESCRIPTION = "enroll-agent gives an embedded Linux device its own X.509 identity: it creates \
               a key (software, PKCS#11 token or TPM 2.0), enrolls it with the fleet's CA \
               (Envision EnOS, Keytos EZCA, Sectigo Certificate Manager, Securosys TSB) and \
               keeps the certificate renewed."
HOMEPAGE = "https://example.invalid/enroll-agent"
BUGTRACKER = "https://example.invalid/enroll-agent/issues"
SECTION = "security"
CVE_PRODUCT = "enroll-agent"
# The workspace is Apache-2.0 (Cargo.toml [workspace.package]); the repository has no separate
# license file, so the checksum covers that line. yocto/check.sh verifies it against Cargo.toml.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=12;endline=12;md5=2507bd5f0713f05419cd2f22fa06fe62"

# Where the sources come from: set ENROLL_AGENT_GIT_URI / SRCREV in a bbappend or local.conf
# (layer README). The default names no real host on purpose.
ENROLL_AGENT_GIT_URI ?= "git://example.invalid/enroll-agent.git;protocol=https;branch=main"
SRC_URI = "\
    ${ENROLL_AGENT_GIT_URI} \
    file://enroll-agent.service \
    file://enroll-agent-renew.service \
    file://enroll-agent-renew.timer \
    file://enroll-agent.tmpfiles \
    file://10-tpm.conf \
    file://config.json \
"
# Placeholder: pin the commit whose Cargo.lock enroll-agent-crates.inc was generated from.
SRCREV = "0000000000000000000000000000000000000000"

# Releases before styhead have no UNPACKDIR and unpack into WORKDIR.
UNPACKDIR ??= "${WORKDIR}"
S = "${UNPACKDIR}/git"

# The pinned crates (crate:// + sha256), generated from Cargo.lock by yocto/gen-crates-inc.py.
require ${BPN}-crates.inc

inherit cargo pkgconfig systemd useradd features_check

# The units and tmpfiles.d snippet are the only way the agent is started.
REQUIRED_DISTRO_FEATURES = "systemd"

# Build only the agent crate of the workspace (not the hal library alone, not the test crate
# with the CA emulator), and only its binary. The lock file is the workspace's.
CARGO_SRC_DIR = "agent"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

# Optional hardware key providers (cargo features of the enroll-agent crate) and the image's
# scheduling variant:
#   pkcs11: keys on a token/HSM through its PKCS#11 module, loaded with dlopen at run time, so no
#           build-time dependency. The module (softhsm, opensc, tpm2-pkcs11, a vendor's) is the
#           integrator's choice: add it to the image or to RRECOMMENDS in a bbappend.
#   tpm:    keys in a TPM 2.0 through tpm2-tss (meta-security/meta-tpm): links libtss2-esys/mu/
#           sys/tctildr; the device TCTI is dlopened by tctildr, so it is an explicit RDEPENDS.
#           Also installs the 10-tpm.conf drop-ins that open /dev/tpmrm0 to the services.
#   timer:  enable enroll-agent-renew.timer instead of the long-running enroll-agent.service.
# and one per CA protocol and for the remote key provider (design.md §8), all on by default; a
# config naming one that is left out is refused with exit 78 naming its cargo feature:
#   enos, ezca, sectigo, securosys: the EnOS, EZCA, Sectigo SCM and Securosys TSB API clients.
#   est:      the EST client (RFC 7030).
#   acme:     the ACME client (RFC 8555, with ARI); acme-tls-alpn adds the tls-alpn-01 challenge
#             (a TLS server in the agent, about 115 KB), off by default.
#   scep:     the SCEP client (RFC 8894; RSA-2048 device keys).
#   redtrust: the Redtrust remote key provider (key.provider "redtrust").
PACKAGECONFIG ??= "enos ezca sectigo securosys est acme scep redtrust"
PACKAGECONFIG[enos] = ",,,"
PACKAGECONFIG[ezca] = ",,,"
PACKAGECONFIG[sectigo] = ",,,"
PACKAGECONFIG[securosys] = ",,,"
PACKAGECONFIG[est] = ",,,"
PACKAGECONFIG[acme] = ",,,"
PACKAGECONFIG[acme-tls-alpn] = ",,,"
PACKAGECONFIG[scep] = ",,,"
PACKAGECONFIG[redtrust] = ",,,"
PACKAGECONFIG[pkcs11] = ",,,,"
PACKAGECONFIG[tpm] = ",,tpm2-tss,libtss2-tcti-device"
PACKAGECONFIG[timer] = ",,,"

# The cargo features are passed explicitly: scarthgap's cargo class does not add
# PACKAGECONFIG_CONFARGS to the cargo command line (later ones do), so the PACKAGECONFIG flags
# above leave their first field empty and this works on every release without doubling.
CARGO_BUILD_FLAGS += "--bin enroll-agent --no-default-features ${@' '.join('--features=' + f for f in bb.utils.filter('PACKAGECONFIG', 'enos ezca sectigo securosys est acme acme-tls-alpn scep redtrust pkcs11 tpm', d).split())}"

# Defaults compiled into the binary (read with option_env! at build time).
export ENROLL_AGENT_DEFAULT_CONFIG = "${sysconfdir}/enroll-agent/config.json"
export ENROLL_AGENT_DEFAULT_STATE_DIR = "${localstatedir}/lib/enroll-agent"
# The workspace release profile strips the binary; BitBake splits debug info itself and its QA
# rejects already-stripped files. Cargo config (here: environment) overrides Cargo.toml profiles.
export CARGO_PROFILE_RELEASE_STRIP = "false"

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system enroll-agent"
USERADD_PARAM:${PN} = "--system --gid enroll-agent --home-dir ${localstatedir}/lib/enroll-agent \
                       --no-create-home --shell ${base_sbindir}/nologin --comment 'enroll-agent' enroll-agent"

SYSTEMD_SERVICE:${PN} = "${@bb.utils.contains('PACKAGECONFIG', 'timer', 'enroll-agent-renew.timer', 'enroll-agent.service', d)}"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    for unit in enroll-agent.service enroll-agent-renew.service enroll-agent-renew.timer; do
        install -m 0644 ${UNPACKDIR}/$unit ${D}${systemd_system_unitdir}/$unit
        sed -i -e 's#/usr/bin/#${bindir}/#g' \
            -e 's#/var/lib/enroll-agent#${localstatedir}/lib/enroll-agent#g' \
            -e 's#/usr/share/doc/#${docdir}/#g' \
            ${D}${systemd_system_unitdir}/$unit
    done
    if ${@bb.utils.contains('PACKAGECONFIG', 'tpm', 'true', 'false', d)}; then
        for unit in enroll-agent.service enroll-agent-renew.service; do
            install -d ${D}${systemd_system_unitdir}/$unit.d
            install -m 0644 ${UNPACKDIR}/10-tpm.conf ${D}${systemd_system_unitdir}/$unit.d/10-tpm.conf
        done
    fi

    install -d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${UNPACKDIR}/enroll-agent.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/enroll-agent.conf
    sed -i -e 's#/var/lib/enroll-agent#${localstatedir}/lib/enroll-agent#g' \
        ${D}${nonarch_libdir}/tmpfiles.d/enroll-agent.conf

    # Config: readable by the agent's group only; secrets (*_file) are provisioned per device,
    # 0600 and owned by enroll-agent, next to it or on the persistent partition.
    install -d -m 0750 -g enroll-agent ${D}${sysconfdir}/enroll-agent
    install -m 0640 -g enroll-agent ${UNPACKDIR}/config.json ${D}${sysconfdir}/enroll-agent/config.json
    sed -i -e 's#/etc/enroll-agent/#${sysconfdir}/enroll-agent/#g' \
        -e 's#/var/lib/enroll-agent#${localstatedir}/lib/enroll-agent#g' \
        ${D}${sysconfdir}/enroll-agent/config.json

    # The units' Documentation= points here (package ${PN}-doc).
    install -d ${D}${docdir}/${BPN}
    install -m 0644 ${S}/README.md ${D}${docdir}/${BPN}/README.md

    # The state directory itself ships (empty, 0700) so that it exists as a mount point on a
    # read-only rootfs; tmpfiles.d / StateDirectory= fix owner and mode at boot.
    install -d -m 0700 -o enroll-agent -g enroll-agent ${D}${localstatedir}/lib/enroll-agent
}

FILES:${PN} += "\
    ${systemd_system_unitdir} \
    ${nonarch_libdir}/tmpfiles.d/enroll-agent.conf \
    ${localstatedir}/lib/enroll-agent \
"
CONFFILES:${PN} = "${sysconfdir}/enroll-agent/config.json"

# The default config relies on the system CA bundle (no tls.trust_bundle).
RDEPENDS:${PN} += "ca-certificates"

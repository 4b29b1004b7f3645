#!/usr/bin/env python3
"""Sorts the CA emulator's recorded exchanges into the fuzz targets' seed corpora.

    python3 tests/fuzz/seeds.py DUMP_DIR

DUMP_DIR holds `<pid>-<n>.<path>.req` and `<pid>-<n>.<path>.<status>.resp` files written by the
emulator under ENROLL_EMULATOR_DUMP (tests/fuzz/seeds.sh runs the emulator's own test suite that
way). Each target's corpus/<target>/ is replaced; files are named by their SHA-1, as libFuzzer
names what it finds. Vendor answers are stored as the targets read them: the status as two
big-endian bytes, then the body. A few inputs no emulator sends (config files, state.json,
header values, a login redirect) are written here by hand.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
# Distinct inputs kept per (target, endpoint, status): enough variety, a small repository.
PER_KIND = 3
PER_TARGET = 80

VENDORS = [
    ("enos", ("apim_token_service_", "connect_service_", "enos_CA_")),
    ("ezca", ("api_CA_", "api_Certificates_", "tenant_")),
    ("sectigo", ("api_ssl_v1_",)),
    ("securosys", ("v1_",)),
    ("redtrust", ("authclient_", "authapi_", "raapi_")),
    ("est", ("_well_known_est_",)),
]

PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\s*", re.S)
PEM_CSR = re.compile(r"-----BEGIN CERTIFICATE REQUEST-----(.*?)-----END CERTIFICATE REQUEST-----", re.S)


def vendor_of(path):
    for name, prefixes in VENDORS:
        if path.startswith(prefixes) or (name == "ezca" and "oauth2" in path):
            return name
    return None


def json_strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from json_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from json_strings(item)


def main(dump):
    seeds = {}  # target -> {kind -> [bytes]}

    def add(target, kind, data):
        bucket = seeds.setdefault(target, {}).setdefault(kind, [])
        if data not in bucket and len(bucket) < PER_KIND:
            bucket.append(data)

    for name in sorted(os.listdir(dump)):
        body = open(os.path.join(dump, name), "rb").read()
        parts = name.split(".")
        path = parts[1]
        # Ids in paths (sslId, signRequestId) would make every request its own kind.
        kind = re.sub(r"_[0-9a-f]{6,}.*|_[0-9]+.*", "", path)
        vendor = vendor_of(path)
        try:
            parsed = json.loads(body) if body.strip() else None
        except ValueError:
            parsed = None
        if parsed is not None and len(body) < 8192:
            add("json", f"{kind}.{parts[-1]}", body)
        texts = list(json_strings(parsed)) if parsed is not None else [body.decode("latin-1")]
        if name.endswith(".req"):
            # The CSRs devices send: PEM in JSON bodies, base64 DER to EST.
            for text in texts:
                for b64 in PEM_CSR.findall(text):
                    add("csr", kind, base64.b64decode("".join(b64.split())))
            if vendor == "est" and body.strip():
                try:
                    add("csr", kind, base64.b64decode(b"".join(body.split())))
                except ValueError:
                    pass
            continue
        status = int(parts[-2])
        if vendor == "est":
            # The first byte picks the content type: 1 is application/pkcs7-mime.
            add("est", f"{kind}.{status}", bytes([1 if status == 200 else 0]) + body)
        elif vendor is not None:
            add(vendor, f"{kind}.{status}", status.to_bytes(2, "big") + body)
        # Certificates answered as PEM text or inside JSON fields, one chain per answer.
        pem = b"".join(m.group(0) for t in texts for m in PEM_CERT.finditer(t.encode("latin-1")))
        if pem:
            add("pki", kind, b"\x01" + pem)
            add("pki", kind + ".fixed", b"\x00" + pem)
        if vendor == "redtrust" and isinstance(parsed, dict):
            data = parsed.get("data")
            if isinstance(data, dict) and isinstance(data.get("csr"), str):
                add("csr", "redtrust-create", base64.b64decode(data["csr"]))

    for target, text in HAND_WRITTEN:
        add(target, "hand-written-" + hashlib.sha1(text).hexdigest(), text)

    total = 0
    for target in sorted(seeds):
        directory = os.path.join(CORPUS, target)
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        inputs = [data for kind in sorted(seeds[target]) for data in seeds[target][kind]][:PER_TARGET]
        for data in inputs:
            with open(os.path.join(directory, hashlib.sha1(data).hexdigest()), "wb") as f:
                f.write(data)
        size = sum(len(d) for d in inputs)
        total += size
        print(f"{target}: {len(inputs)} seeds, {size} bytes")
    print(f"total: {total} bytes")


def config(ca, **extra):
    value = {
        "state_dir": "/tmp/enroll-fuzz-config/state",
        "subject": {"CN": "sensor-0042", "O": "Acme", "C": "NL"},
        "san": {"dns": ["sensor-0042.devices.acme.example"], "ip": ["10.0.0.42"]},
        "key": {"algorithm": "p256", "provider": "file", "rotate_on_renew": True},
        "ca": ca,
        "tls": {"timeout_s": 2},
        "renewal": {"retry_initial_s": 1, "retry_max_s": 4},
    }
    value.update(extra)
    return json.dumps(value, indent=2).encode()


# The config target creates this 0600 file before the first input, so that `*_file` fields
# naming it are read and the fields after them checked too.
SECRET = "/tmp/enroll-fuzz-config/secret"
URL = "https://ca.example.com"

HAND_WRITTEN = [
    ("config", config({"backend": "enos", "api_gateway": URL, "org_id": "o1", "asset_id": "a1",
                       "app_key": "k", "app_secret_file": SECRET, "valid_days": 30})),
    ("config", config({"backend": "ezca", "url": URL, "ca_id": "c", "template_id": "t", "valid_days": 30,
                       "bootstrap": {"token_file": SECRET}}, key={"algorithm": "rsa2048", "provider": "file"})),
    ("config", config({"backend": "sectigo", "url": URL, "customer_uri": "acme", "login": "l",
                       "password_file": SECRET, "org_id": 1, "cert_type": 2, "term": 365,
                       "poll_interval_s": 1, "poll_wait_s": 10})),
    ("config", config({"backend": "securosys", "url": URL, "sign_key_name": "ca", "jwt_file": SECRET,
                       "api_key_file": SECRET, "valid_days": 30, "approval": True, "poll_interval_s": 1})),
    ("config", config({"backend": "est", "url": URL, "label": "meters",
                       "bootstrap": {"username": "u", "password_file": SECRET},
                       "poll_wait_s": 10, "poll_timeout_s": 60})),
    ("config", config({"backend": "enos", "api_gateway": URL, "org_id": "o1", "asset_id": "a1",
                       "app_key": "k", "app_secret_file": SECRET},
                      hooks={"after_install": ["/bin/true"], "timeout_s": 5},
                      storage={"group": "root"})),
    ("state", b'{\n  "pending": null,\n  "renew_at": 1800000000,\n  "ca_ref": "9223372036854775807",\n'
              b'  "last_success": 1790000000,\n  "last_install": 1790000000,\n  "last_error": null,\n'
              b'  "last_error_at": null,\n  "hook_error": null,\n  "renewals": 3,\n'
              b'  "clock_floor": 1790000000\n}\n'),
    ("state", b'{"pending":{"request_id":"r-1","key_ref":"P775W98SSW4Z1774PMZU","slot":"4","since":10,'
              b'"purpose":"renew"},"renewals":0,"last_error":"EnOS code 99400: revoked"}'),
    ("headers", b"120"),
    ("headers", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ("headers", b"2026-11-22T18:55:00Z"),
    ("headers", b"2026-11-22T18:55:00.123+01:00"),
    ("redtrust", b"\x01\x2ehttps://device.example.com/callback?tkn=eyJ0a24iOiIxIn0%3D&state=1#x"),
]

if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python3
"""Soak run (issue 11 item 4): a fleet of real `enroll-agent run` processes renewing short-lived
certificates through a real `enroll-gateway serve` (SQLite) in front of the EnOS emulator, with
a burst of CA failures in the middle. Prints one line per sample and a summary; exits 1 when an
invariant breaks. Driven by tests/soak/run.sh, which builds the binaries.

What is checked (the run fails on any):
  - every agent is still running at the end, stops on SIGTERM with 0, and `check` passes;
  - every device's installed chain verifies with `openssl verify` against the EnOS root;
  - no device holds more than 3 slots (current, previous, one pending) at any sample;
  - per-process RSS and open file descriptors do not grow between the first and the last quarter
    of the run: their floor (the least seen in a quarter, between renewals) may not rise by more
    than 25 % or 4 fds (peaks depend on how many requests are in flight at the sample);
  - the EnOS app secret appears in no device file.
What is printed and not asserted: renewals per minute, upstream requests per minute, and the
peak after the fault burst divided by the steady mean (the retry-storm figure).
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import ssl

BIN = os.environ.get("SOAK_BIN", "target/debug")
MINUTES = float(sys.argv[1]) if len(sys.argv) > 1 else 60
DEVICES = int(sys.argv[2]) if len(sys.argv) > 2 else 200
LIFETIME_S = int(os.environ.get("SOAK_LIFETIME_S", "180"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_S", "30"))
LABEL = "meters"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def wait_for(path, needle, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if needle in text:
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"soak: {needle!r} did not appear in {path}")


def proc_status(pid):
    """(VmRSS KiB, VmHWM KiB, open fds) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kib = lambda k: int(fields[k].split()[0])
    return kib("VmRSS"), kib("VmHWM"), fds


class Emulator:
    def __init__(self, work):
        self.dir = os.path.join(work, "emulator")
        out = open(os.path.join(work, "emulator.out"), "w")
        self.proc = subprocess.Popen(
            [f"{BIN}/ca-emulator", "--dir", self.dir, "--enos-fleet", "--enos-leaf-lifetime-s", str(LIFETIME_S)],
            stdout=out, stderr=subprocess.STDOUT)
        wait_for(os.path.join(work, "emulator.out"), "ca-emulator ready")
        with open(os.path.join(self.dir, "emulator.json")) as f:
            self.info = json.load(f)
        self.url = self.info["url"]
        self.tls = ssl.create_default_context(cafile=os.path.join(self.dir, "tls-root.pem"))

    def control(self, method, path, body=b""):
        req = urllib.request.Request(self.url + path, data=body if method == "POST" else None, method=method)
        with urllib.request.urlopen(req, context=self.tls, timeout=30) as r:
            return r.read()

    def issuing_requests(self):
        """EnOS apply/renew requests the emulator has seen, and how many answered 5xx."""
        total = failed = 0
        for line in self.control("GET", "/_emulator/log").splitlines():
            entry = json.loads(line)
            if entry.get("path") == "/connect-service/v2.0/certificates":
                total += 1
                failed += entry.get("status", 0) >= 500
        return total, failed


def gateway_tls(gw):
    ossl = lambda *a: sh("openssl", *a)
    ossl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=Soak Gateway CA", "-keyout", f"{gw}/server-ca.key", "-out", f"{gw}/server-ca.pem")
    ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=gateway.soak", "-keyout", f"{gw}/server.key", "-out", f"{gw}/server.csr")
    with open(f"{gw}/server.ext", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ossl("x509", "-req", "-in", f"{gw}/server.csr", "-CA", f"{gw}/server-ca.pem", "-CAkey", f"{gw}/server-ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", f"{gw}/server.ext", "-out", f"{gw}/server.pem")
    os.chmod(f"{gw}/server.key", 0o600)


def start_gateway(work, emu):
    gw = os.path.join(work, "gateway")
    os.mkdir(gw, 0o700)
    gateway_tls(gw)
    with open(f"{gw}/enos-ca.pem", "w") as f:
        f.write(emu.info["ca"]["enos_root_pem"])
    config = {
        "listen": "127.0.0.1:0",
        "tls": {"cert_file": "server.pem", "key_file": "server.key"},
        "database": {"url": f"sqlite://{gw}/gateway.db"},
        "labels": {LABEL: {
            "ca": {"backend": "enos", "api_gateway": emu.url, "org_id": emu.info["enos"]["org_id"],
                   "app_key": emu.info["enos"]["app_key"], "app_secret_file": f"{emu.dir}/enos-app-secret",
                   "product_key": emu.info["enos"]["product_key"], "device_key": "{device}", "valid_days": 1},
            "ca_certs_file": "enos-ca.pem",
            "bootstrap": {"tokens": True},
            # Each device renews about once a minute: far above a production quota.
            "policy": {"san_dns": ["{device}.devices.acme.example"], "max_per_device_per_day": 100000},
        }},
        "upstream": {"trust_bundle": f"{emu.dir}/tls-root.pem", "timeout_s": 20},
    }
    with open(f"{gw}/config.json", "w") as f:
        json.dump(config, f)
    log = open(f"{gw}/serve.log", "w")
    proc = subprocess.Popen([f"{BIN}/enroll-gateway", "-c", f"{gw}/config.json", "serve"], stderr=log)
    text = wait_for(f"{gw}/serve.log", "serving EST on ")
    addr = text.split("serving EST on ", 1)[1].split(",")[0].split()[0]
    return gw, proc, addr


def start_device(work, gw, addr, n):
    device = f"soak-{n:04d}"
    home = os.path.join(work, "devices", device)
    os.makedirs(home, 0o700)
    token = sh(f"{BIN}/enroll-gateway", "-c", f"{gw}/config.json", "token", "create",
               "--label", LABEL, "--device", device).strip()
    fd = os.open(f"{home}/token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (token + "\n").encode())
    os.close(fd)
    config = {
        "ca": {"backend": "est", "url": f"https://{addr}", "label": LABEL,
               "bootstrap": {"username": device, "password_file": f"{home}/token"}},
        "key": {"provider": "file", "algorithm": "p256", "rotate_on_renew": True},
        "subject": {"CN": device, "O": "Acme"},
        "san": {"dns": [f"{device}.devices.acme.example"]},
        "state_dir": f"{home}/state",
        "tls": {"trust_bundle": f"{gw}/server-ca.pem", "timeout_s": 30},
        # Lifetimes of minutes instead of months, the policy's times scaled down alike: the
        # emulator backdates notBefore by 60 s, so 0.55 of 240 s is about 72 s after issue
        # (the agent never renews sooner than 60 s after an install).
        "renewal": {"at_fraction": 0.55, "retry_initial_s": 5, "retry_max_s": 60},
    }
    with open(f"{home}/agent.json", "w") as f:
        json.dump(config, f)
    log = open(f"{home}/run.log", "w")
    proc = subprocess.Popen([f"{BIN}/enroll-agent", "-c", f"{home}/agent.json", "run"], stderr=log)
    return device, home, proc


def slots(home):
    try:
        return len(os.listdir(f"{home}/state/slots"))
    except FileNotFoundError:
        return 0


def issued_count(gw):
    db = sqlite3.connect(f"file:{gw}/gateway.db?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]
    finally:
        db.close()


def main():
    work = tempfile.mkdtemp(prefix="enroll-soak.")
    os.chmod(work, 0o700)
    print(f"soak: {DEVICES} devices for {MINUTES:g} min, certificates living {LIFETIME_S} s, work dir {work}")
    emu = Emulator(work)
    gw, gateway, addr = start_gateway(work, emu)
    devices = [start_device(work, gw, addr, n) for n in range(DEVICES)]
    problems = []
    samples = []  # (t, issued, upstream, failed, agent max rss, max hwm, max fds, max slots, gw rss, gw fds)
    per_process = {}  # pid -> [(t, rss, fds)]
    start = time.time()
    end = start + MINUTES * 60
    burst = (start + (end - start) * 0.45, start + (end - start) * 0.45 + min(120, (end - start) * 0.1))
    burst_state = "before"
    print("  min  issued  upstream  5xx  agent-rss-max  agent-hwm-max  fds-max  slots-max  gw-rss  gw-fds")
    while time.time() < end:
        time.sleep(max(0, min(SAMPLE_S, end - time.time())))
        now = time.time()
        if burst_state == "before" and now >= burst[0]:
            emu.control("POST", "/_emulator/fault", b"http503")
            burst_state = "on"
            print(f"  -- fault burst: every EnOS apply/renew answers 503 for {burst[1] - burst[0]:.0f} s")
        elif burst_state == "on" and now >= burst[1]:
            emu.control("DELETE", "/_emulator/fault")
            burst_state = "after"
            print("  -- fault burst over")
        rss = hwm = fds = max_slots = 0
        for device, home, proc in devices:
            if proc.poll() is not None:
                problems.append(f"{device}: `run` exited with {proc.returncode} (see {home}/run.log)")
                continue
            st = proc_status(proc.pid)
            if st:
                rss, hwm, fds = max(rss, st[0]), max(hwm, st[1]), max(fds, st[2])
                per_process.setdefault(proc.pid, []).append((now - start, st[0], st[2]))
            s = slots(home)
            max_slots = max(max_slots, s)
            if s > 3:
                problems.append(f"{device}: {s} slots")
        gst = proc_status(gateway.pid) or (0, 0, 0)
        per_process.setdefault("gateway", []).append((now - start, gst[0], gst[2]))
        upstream, failed = emu.issuing_requests()
        issued = issued_count(gw)
        samples.append((now - start, issued, upstream, failed, rss, hwm, fds, max_slots, gst[0], gst[2]))
        print(f"{(now - start) / 60:5.1f} {issued:7d} {upstream:9d} {failed:4d} {rss:10d} KiB {hwm:10d} KiB"
              f" {fds:8d} {max_slots:10d} {gst[0]:6d} KiB {gst[2]:6d}", flush=True)
        if problems:
            break

    # The identities must be valid at the end of the run; the checks below take a while and the
    # certificates live minutes, so chains are verified as of this instant.
    stopped_at = int(time.time())
    for device, home, proc in devices:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for device, home, proc in devices:
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "no exit within 60 s"
        if code != 0 and not any(p.startswith(device) for p in problems):
            problems.append(f"{device}: `run` ended with {code} on SIGTERM")
    gateway.send_signal(signal.SIGTERM)
    if gateway.wait(timeout=60) != 0:
        problems.append(f"gateway: serve ended with {gateway.returncode} on SIGTERM")

    root = f"{gw}/enos-ca.pem"
    secret = open(f"{emu.dir}/enos-app-secret").read().strip().encode()
    renewals = 0
    for device, home, proc in devices:
        check = subprocess.run([f"{BIN}/enroll-agent", "-c", f"{home}/agent.json", "check"], capture_output=True, text=True)
        if check.returncode != 0:
            problems.append(f"{device}: check exited {check.returncode}: {check.stderr.strip()[:200]}")
        verify = subprocess.run(["openssl", "verify", "-attime", str(stopped_at), "-CAfile", root,
                                 "-untrusted", f"{home}/state/current/chain.pem",
                                 f"{home}/state/current/cert.pem"], capture_output=True, text=True)
        if verify.returncode != 0:
            problems.append(f"{device}: openssl verify: {verify.stdout.strip()} {verify.stderr.strip()}")
        for folder, _, files in os.walk(home):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    if secret in f.read():
                        problems.append(f"{device}: the EnOS app secret is in {os.path.join(folder, name)}")
    emu.proc.terminate()

    # Leaks: the floor of the last quarter against the floor of the first quarter after a
    # warm-up (the first tenth: pools fill, the first renewals run), per process.
    quarter = MINUTES * 60 / 4
    warm = MINUTES * 60 / 10
    worst_rss, worst_fds = (None, 0.0), (None, 0)
    for pid, points in per_process.items():
        first = [p for p in points if warm <= p[0] <= warm + quarter]
        last = [p for p in points if p[0] >= 3 * quarter]
        if not first or not last:
            continue
        rss_growth = min(p[1] for p in last) / max(1, min(p[1] for p in first))
        fd_growth = min(p[2] for p in last) - min(p[2] for p in first)
        if rss_growth > worst_rss[1]:
            worst_rss = (pid, rss_growth)
        if fd_growth > worst_fds[1]:
            worst_fds = (pid, fd_growth)
        name = "gateway" if pid == "gateway" else f"agent pid {pid}"
        if rss_growth > 1.25:
            problems.append(f"{name}: RSS floor grew {rss_growth:.2f}x from the first to the last quarter")
        if fd_growth > 4:
            problems.append(f"{name}: open-fd floor grew by {fd_growth} from the first to the last quarter")

    db = sqlite3.connect(f"file:{gw}/gateway.db?mode=ro", uri=True)
    outcomes = db.execute("SELECT operation, outcome, COUNT(*) FROM audit GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    db.close()
    print("soak: gateway decisions: " + ", ".join(f"{op} {outcome} {n}" for op, outcome, n in outcomes))
    total_issued = samples[-1][1] if samples else 0
    renewals = total_issued - DEVICES
    # Upstream requests per sample interval: steady mean before the burst vs the peak after it.
    # (interval start, requests in it); "after" = the intervals that begin once the burst is over.
    rates = [(a[0], b[2] - a[2]) for a, b in zip(samples, samples[1:])]
    steady = [r for t, r in rates if MINUTES * 60 * 0.15 <= t and t + SAMPLE_S <= burst[0] - start]
    after = [r for t, r in rates if burst[1] - start <= t <= burst[1] - start + 600]
    mean = sum(steady) / len(steady) if steady else 0
    print(f"soak: {total_issued} certificates issued ({renewals} renewals by {DEVICES} devices) in {MINUTES:g} min")
    if mean:
        print(f"soak: upstream requests per {SAMPLE_S:g} s: steady mean {mean:.1f}, peak after the burst "
              f"{max(after, default=0)} ({max(after, default=0) / mean:.2f}x the mean)")
    print(f"soak: worst RSS-floor growth first->last quarter {worst_rss[1]:.2f}x ({worst_rss[0]}), "
          f"worst fd-floor growth {worst_fds[1]} ({worst_fds[0]})")
    gw_points = per_process.get("gateway", [])
    if gw_points:
        print(f"soak: gateway RSS {gw_points[0][1]} KiB at the first sample, {max(p[1] for p in gw_points)} KiB at most, "
              f"{gw_points[-1][1]} KiB at the last; fds {gw_points[0][2]} / {max(p[2] for p in gw_points)} / {gw_points[-1][2]}")
    if problems:
        print(f"soak: FAILED, {len(problems)} problems (work dir {work}):")
        for p in problems[:30]:
            print(f"  {p}")
        sys.exit(1)
    if os.environ.get("SOAK_KEEP"):
        print(f"soak: passed (work dir {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)
        print("soak: passed (SOAK_KEEP=1 keeps the work dir)")


if __name__ == "__main__":
    main()

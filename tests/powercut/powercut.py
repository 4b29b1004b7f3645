#!/usr/bin/env python3
"""Power cuts (issue 11 item 2): every on-disk state a power cut could leave during `enroll` and
`renew --force`, built from the agent's own file-system calls, and design.md §4 checked in each.

A kill keeps what the kernel already has; a power cut loses what was not synced. The agent runs
once under strace (every call that changes or syncs the state directory, with the bytes
written); the calls are replayed into a model file system, and a crash at each call is
explored under this persistence model:

  - metadata (create, mkdir, symlink, rename, unlink, rmdir, chmod) reaches the disk in the
    order it was made, as a journal commits it: the disk holds a prefix of the metadata
    operations, at least up to the last one a sync covered (fsync of the directory an entry
    is in; fsync of a file for its mode);
  - file data is independent of metadata (the ext4 data=writeback worst case, stricter than the
    default data=ordered): each file keeps its synced writes, and of its unsynced writes none,
    all, or a prefix of them; a renamed or created file may therefore appear empty or cut.

Each distinct state is materialized into a fresh directory and checked:
  1. if an identity was installed before the operation, `check` passes (the old or the new
     identity is usable); in any state, a `current` link that exists names a usable identity;
  2. `state.json` is JSON or absent, or the next run moves it aside (design.md §4);
  3. the next run (`enroll`, then `renew`) exits 0 and `check` passes after it;
  4. at most one slot is referred to by nothing (`current`, `previous`, the pending request).

Usage: powercut.py AGENT_BIN CONFIG...   (tests/powercut/run.sh starts the emulator and passes
its configs; POWERCUT_MAX_STATES_PER_CUT, default 64, bounds the persistence choices per cut,
sampled with a fixed seed beyond that). Prints the states explored and the violations; exit 1 on
any violation.
"""

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

AGENT = sys.argv[1]
CONFIGS = sys.argv[2:]
MAX_STATES_PER_CUT = int(os.environ.get("POWERCUT_MAX_STATES_PER_CUT", "64"))
# Self-test of the explorer: pretend no fsync ever happened. An agent that did not sync would
# lose key and certificate bytes behind a `current` that survived; the run must report it.
IGNORE_SYNCS = os.environ.get("POWERCUT_IGNORE_SYNCS") == "1"
SYSCALLS = ("openat,open,creat,write,pwrite64,ftruncate,rename,renameat,renameat2,unlink,unlinkat,"
            "mkdir,mkdirat,rmdir,symlink,symlinkat,fsync,fdatasync,fchmod,fchmodat,chmod,close")

HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
FD = re.compile(r'(-?\d+|AT_FDCWD)<((?:\\x[0-9a-f]{2})*)>')


def unhex(s):
    return bytes.fromhex(s.replace("\\x", ""))


def agent(config, *args):
    return subprocess.run([AGENT, "-q", "-c", config, *args], capture_output=True, text=True)


# ---- the trace -------------------------------------------------------------------------------

def trace(config, state_dir, *args):
    """Runs the agent under strace; returns the operations on `state_dir`, in order."""
    out = tempfile.mktemp(prefix="powercut-trace.")
    run = subprocess.run(["strace", "-f", "-y", "-xx", "-s", "1000000", "-o", out, "-e", "trace=" + SYSCALLS,
                          AGENT, "-q", "-c", config, *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"powercut: the traced `{' '.join(args)}` exited {run.returncode}: {run.stderr.strip()}")
    with open(out) as f:
        lines = merge_unfinished(f.read().splitlines())
    os.unlink(out)
    return parse(lines, state_dir.rstrip("/") + "/")


def merge_unfinished(lines):
    """Joins `call(... <unfinished ...>` with its `<... call resumed> ...)` line (threads)."""
    pending, merged = {}, []
    for line in lines:
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip(" ")  # strace pads short pids
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
        elif rest.startswith("<... ") and pid in pending:
            merged.append(pid + " " + pending.pop(pid) + rest.split("resumed>", 1)[1])
        else:
            merged.append(line)
    return merged


def parse(lines, root):
    """Model operations: (kind, fields) with kind in create, mkdir, symlink, rename, unlink,
    rmdir, chmod (metadata); write, truncate (data); fsync, dirsync (barriers)."""
    ops, fds = [], {}  # fd -> [path, offset, is_dir]

    def under(path):
        return path == root[:-1] or path.startswith(root)

    def resolve(dirpath, path):
        return os.path.normpath(path if path.startswith("/") else os.path.join(dirpath, path))

    for line in lines:
        m = re.match(r"\d+ +(\w+)\((.*)\) += (-?\d+)(<((?:\\x[0-9a-f]{2})*)>)?", line)
        if not m:
            continue
        call, argtext, ret = m.group(1), m.group(2), int(m.group(3))
        if ret < 0:
            continue
        strings = [unhex(s).decode("utf-8", "surrogateescape") for s in HEX.findall(argtext)]
        dirfds = [(n, unhex(p).decode("utf-8", "surrogateescape")) for n, p in FD.findall(argtext)]
        if call in ("openat", "open", "creat"):
            base = dirfds[0][1] if call == "openat" else os.getcwd()
            path = resolve(base, strings[0])
            if not under(path):
                continue
            flags = argtext.split(",")[2 if call == "openat" else 1] if call != "creat" else "O_CREAT|O_TRUNC"
            is_dir = "O_DIRECTORY" in flags
            if "O_CREAT" in flags:
                mode = int(re.search(r", (0\d+)\)?$", argtext).group(1), 8)
                ops.append(("create", {"path": path, "mode": mode}))
            if "O_TRUNC" in flags:
                ops.append(("truncate", {"path": path, "length": 0}))
            fds[ret] = [path, 0, is_dir]
        elif call in ("write", "pwrite64"):
            fd = int(dirfds[0][0])
            if fd not in fds:
                continue
            data = unhex(HEX.findall(argtext)[0])[:ret]
            entry = fds[fd]
            offset = int(argtext.rsplit(",", 1)[1]) if call == "pwrite64" else entry[1]
            ops.append(("write", {"path": entry[0], "offset": offset, "data": data}))
            if call == "write":
                entry[1] += ret
        elif call == "ftruncate":
            fd = int(dirfds[0][0])
            if fd in fds:
                ops.append(("truncate", {"path": fds[fd][0], "length": int(argtext.rsplit(",", 1)[1])}))
        elif call in ("fsync", "fdatasync"):
            fd = int(dirfds[0][0])
            if fd in fds:
                path, _, is_dir = fds[fd]
                ops.append(("dirsync" if is_dir else "fsync", {"path": path}))
        elif call == "close":
            fds.pop(int(dirfds[0][0]) if dirfds else -1, None)
        elif call in ("rename", "renameat", "renameat2"):
            if call == "rename":
                old, new = resolve(os.getcwd(), strings[0]), resolve(os.getcwd(), strings[1])
            else:
                old, new = resolve(dirfds[0][1], strings[0]), resolve(dirfds[1][1], strings[1])
            if under(old) or under(new):
                ops.append(("rename", {"path": old, "to": new}))
        elif call in ("unlink", "unlinkat", "rmdir"):
            path = resolve(dirfds[0][1] if call == "unlinkat" else os.getcwd(), strings[0])
            if under(path):
                ops.append(("rmdir" if call == "rmdir" or "AT_REMOVEDIR" in argtext else "unlink", {"path": path}))
        elif call in ("mkdir", "mkdirat"):
            path = resolve(dirfds[0][1] if call == "mkdirat" else os.getcwd(), strings[0])
            if under(path):
                ops.append(("mkdir", {"path": path, "mode": int(argtext.rsplit(",", 1)[1].strip(), 8)}))
        elif call in ("symlink", "symlinkat"):
            base = dirfds[0][1] if call == "symlinkat" else os.getcwd()
            path = resolve(base, strings[1])
            if under(path):
                ops.append(("symlink", {"path": path, "target": strings[0]}))
        elif call in ("fchmod", "fchmodat", "chmod"):
            if call == "fchmod":
                fd = int(dirfds[0][0])
                path = fds[fd][0] if fd in fds else None
            else:
                path = resolve(dirfds[0][1] if call == "fchmodat" else os.getcwd(), strings[0])
            if path and under(path):
                ops.append(("chmod", {"path": path, "mode": int(argtext.rsplit(",", 1)[1].split()[0], 8)}))
    return ops


# ---- the model file system -------------------------------------------------------------------

META = {"create", "mkdir", "symlink", "rename", "unlink", "rmdir", "chmod"}
DATA = {"write", "truncate"}


class Model:
    """Paths to inodes, inodes to contents: enough of a file system to replay the agent's calls."""

    def __init__(self, root):
        self.names, self.inodes, self.next = {}, {}, 0
        if not os.path.isdir(root):
            return
        for folder, dirs, files in os.walk(root):
            self._add(folder, "d", mode=os.stat(folder).st_mode & 0o7777)
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                if os.path.islink(path):
                    self._add(path, "l", target=os.readlink(path))
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        self._add(path, "f", data=f.read(), mode=st.st_mode & 0o7777)
        # os.walk does not descend into symlinked dirs; directories are added by the walk itself.

    def _add(self, path, kind, data=b"", mode=0o644, target=None, inode=None):
        if path in self.names:
            return self.names[path]
        if inode is None:
            self.next += 1
            inode = self.next
        self.inodes[inode] = {"kind": kind, "data": bytearray(data), "mode": mode, "target": target}
        self.names[path] = inode
        return inode

    def copy(self):
        other = Model.__new__(Model)
        other.names, other.next = dict(self.names), self.next
        other.inodes = {k: dict(v, data=bytearray(v["data"])) for k, v in self.inodes.items()}
        return other

    def inode_of(self, path):
        return self.names.get(path)

    def apply(self, kind, f):
        if kind == "create":
            self._add(f["path"], "f", mode=f["mode"], inode=f.get("inode"))
        elif kind == "mkdir":
            self._add(f["path"], "d", mode=f["mode"], inode=f.get("inode"))
        elif kind == "symlink":
            self._add(f["path"], "l", target=f["target"], inode=f.get("inode"))
        elif kind == "rename":
            old, new = f["path"], f["to"]
            if old not in self.names:
                return
            moved = {p: i for p, i in self.names.items() if p == old or p.startswith(old + "/")}
            for p in moved:
                del self.names[p]
            for p in [p for p in self.names if p == new or p.startswith(new + "/")]:
                del self.names[p]
            for p, i in moved.items():
                self.names[new + p[len(old):]] = i
        elif kind in ("unlink", "rmdir"):
            self.names.pop(f["path"], None)
        elif kind == "chmod":
            if f["inode"] in self.inodes:
                self.inodes[f["inode"]]["mode"] = f["mode"]
        elif kind == "write":
            i = f["inode"]
            if i not in self.inodes:
                return
            data = self.inodes[i]["data"]
            end = f["offset"] + len(f["data"])
            if len(data) < end:
                data.extend(b"\0" * (end - len(data)))
            data[f["offset"]:end] = f["data"]
        elif kind == "truncate":
            if f["inode"] not in self.inodes:
                return
            data = self.inodes[f["inode"]]["data"]
            del data[f["length"]:]

    def materialize(self, old_root, new_root):
        for path in sorted(self.names, key=lambda p: p.count("/")):
            node = self.inodes[self.names[path]]
            dest = new_root + path[len(old_root):]
            if node["kind"] == "d":
                os.makedirs(dest, exist_ok=True)
                os.chmod(dest, node["mode"])
            elif node["kind"] == "l":
                os.symlink(node["target"], dest)
            else:
                with open(dest, "wb") as out:
                    out.write(node["data"])
                os.chmod(dest, node["mode"])

    def digest(self):
        h = hashlib.sha256()
        for path in sorted(self.names):
            node = self.inodes[self.names[path]]
            h.update(f"{path}\0{node['kind']}\0{node['mode']:o}\0{node['target']}\0".encode())
            h.update(bytes(node["data"]) if node["kind"] == "f" else b"")
        return h.hexdigest()


def bind_inodes(before, ops):
    """Replays the whole trace once and names the inode each operation acts on (paths change by
    rename); a create of a file that exists is only an open, and is dropped."""
    model = before.copy()
    bound = []
    for kind, f in ops:
        f = dict(f)
        if kind in ("create", "mkdir", "symlink"):
            if f["path"] in model.names:
                continue
            model.next += 1
            f["inode"] = model.next
        elif kind in DATA or kind in ("fsync", "chmod"):
            f["inode"] = model.inode_of(f["path"])
            if f["inode"] is None:
                continue
            # A directory opened without O_DIRECTORY and fsynced: its entries are synced.
            if kind == "fsync" and model.inodes[f["inode"]]["kind"] == "d":
                kind = "dirsync"
        if IGNORE_SYNCS and kind in ("fsync", "dirsync"):
            continue
        bound.append((kind, f))
        if kind in META or kind in DATA:
            model.apply(kind, f)
    return bound


def parent_of(kind, f):
    if kind == "rename":
        return {os.path.dirname(f["path"]), os.path.dirname(f["to"])}
    return {os.path.dirname(f["path"])}


def crash_states(before, ops, rng):
    """Yields (cut, model) for every crash point and persistence choice (sampled when many)."""
    meta_idx = [i for i, (k, _) in enumerate(ops) if k in META]
    for cut in range(len(ops) + 1):
        done = ops[:cut]
        metas = [i for i in meta_idx if i < cut]
        # The least metadata prefix: every metadata op a sync before the cut covered.
        floor = -1
        for j, (kind, f) in enumerate(done):
            if kind == "dirsync":
                covered = [i for i in metas if i < j and f["path"] in parent_of(*ops[i])]
            elif kind == "fsync":
                covered = [i for i in metas if i < j and ops[i][0] == "chmod" and ops[i][1]["inode"] == f["inode"]]
            else:
                continue
            floor = max([floor] + covered)
        prefixes = [m for m in range(len(metas) + 1) if m == 0 and floor < 0 or m > 0 and metas[m - 1] >= floor]
        # Per file: the index of its last synced write, and its unsynced writes.
        unsynced = {}
        for j, (kind, f) in enumerate(done):
            if kind in DATA:
                unsynced.setdefault(f["inode"], []).append(j)
            elif kind == "fsync":
                unsynced.pop(f["inode"], None)
        choices = []
        for inode, writes in unsynced.items():
            n = len(writes)
            kept = sorted({0, n // 2, n}) if n > 3 else range(n + 1)
            choices.append([(inode, writes[k:]) for k in kept])  # the writes that are lost
        combos = list(itertools.product(prefixes, *choices)) if choices else [(p,) for p in prefixes]
        if len(combos) > MAX_STATES_PER_CUT:
            combos = [combos[0], combos[-1]] + rng.sample(combos[1:-1], MAX_STATES_PER_CUT - 2)
        for combo in combos:
            prefix, lost_lists = combo[0], combo[1:]
            lost = set(metas[prefix:])
            for _, writes in lost_lists:
                lost.update(writes)
            model = before.copy()
            for j, (kind, f) in enumerate(done):
                if j not in lost and (kind in META or kind in DATA):
                    model.apply(kind, f)
            yield cut, model


# ---- checks ----------------------------------------------------------------------------------

def orphans(state):
    def named(link):
        try:
            return os.path.basename(os.readlink(os.path.join(state, link)))
        except OSError:
            return None
    pending = None
    try:
        with open(os.path.join(state, "state.json")) as f:
            pending = (json.load(f).get("pending") or {}).get("slot")
    except (OSError, ValueError, AttributeError):
        pass
    kept = {named("current"), named("previous"), pending}
    try:
        return [s for s in os.listdir(os.path.join(state, "slots")) if s not in kept]
    except OSError:
        return []


def check_state(model, old_root, config, had_identity, scratch):
    state = os.path.join(scratch, "state")
    model.materialize(old_root, state)
    with open(config) as f:
        cfg = json.load(f)
    cfg["state_dir"] = state
    cfg_path = os.path.join(scratch, "agent.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    problems = []
    current = os.path.lexists(os.path.join(state, "current"))
    check = agent(cfg_path, "check")
    if (had_identity or current) and check.returncode != 0:
        problems.append(f"check exited {check.returncode} right after the cut: {check.stderr.strip()}")
    if len(orphans(state)) > 1:
        problems.append(f"{len(orphans(state))} orphan slots right after the cut: {orphans(state)}")
    for args in (["enroll"], ["renew"]):
        run = agent(cfg_path, *args)
        if run.returncode != 0:
            problems.append(f"the next `{' '.join(args)}` exited {run.returncode}: {run.stderr.strip()}")
            break
    check = agent(cfg_path, "check")
    if check.returncode != 0:
        problems.append(f"check exited {check.returncode} after the next run: {check.stderr.strip()}")
    if len(orphans(state)) > 1:
        problems.append(f"{len(orphans(state))} orphan slots after the next run: {orphans(state)}")
    return problems


def record(config, state_dir, args):
    """The state before, whether it held an identity, and the operations of `args`."""
    before = Model(state_dir)
    had_identity = os.path.lexists(os.path.join(state_dir, "current"))
    return before, had_identity, bind_inodes(before, trace(config, state_dir, *args))


def explore(name, config, state_dir, recorded, rng):
    before, had_identity, ops = recorded
    seen, states, violations = set(), 0, []
    scratch_root = tempfile.mkdtemp(prefix="powercut.")
    for cut, model in crash_states(before, ops, rng):
        digest = model.digest()
        if digest in seen:
            continue
        seen.add(digest)
        states += 1
        scratch = os.path.join(scratch_root, str(states))
        os.makedirs(scratch, mode=0o700)
        problems = check_state(model, state_dir, config, had_identity, scratch)
        if problems:
            violations.append((cut, ops[cut - 1][0] if cut else "start", problems, scratch))
        else:
            shutil.rmtree(scratch)
    counts = {k: sum(1 for o in ops if o[0] == k) for k in sorted({o[0] for o in ops})}
    print(f"{name}: {len(ops)} file-system operations ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
          f"{states} distinct power-cut states explored, {len(violations)} violate an invariant")
    for cut, op, problems, scratch in violations[:10]:
        print(f"  cut after operation {cut} ({op}): {'; '.join(problems)} (state kept in {scratch})")
    if not violations:
        shutil.rmtree(scratch_root, ignore_errors=True)
    return states, len(violations)


def main():
    rng = random.Random(20261203)
    total_states = total_violations = 0
    for config in CONFIGS:
        with open(config) as f:
            cfg = json.load(f)
        backend = cfg["ca"]["backend"]
        state_dir = cfg["state_dir"]
        shutil.rmtree(state_dir, ignore_errors=True)
        # Both traces first: checking a state runs the agent, which changes the CA's side.
        flows = [(f"{backend} {name}", record(config, state_dir, args))
                 for name, args in (("enroll (first boot)", ["enroll"]), ("renew --force", ["renew", "--force"]))]
        for name, recorded in flows:
            states, violations = explore(name, config, state_dir, recorded, rng)
            total_states += states
            total_violations += violations
    print(f"{total_states} states explored, {total_violations} violations")
    sys.exit(1 if total_violations else 0)


if __name__ == "__main__":
    main()

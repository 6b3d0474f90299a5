#!/usr/bin/env python3
"""Renders a golden script from a real etcd 3.4, to check eden's expectations against it.

Usage: python3 etcd_check.py FILE...   (needs /usr/bin/etcd; starts a fresh one per file on
127.0.0.1:23791, talks to its JSON gateway, prints a unified diff against FILE and exits 1 on
any difference). The parsing and rendering mirror tests/golden.rs; see there for the syntax.
"""
import base64, difflib, http.client, json, os, shutil, subprocess, sys, tempfile, time

PORT = 23791


def parse_bytes(tok):
    if tok == '""':
        return b""
    out, i = bytearray(), 0
    while i < len(tok):
        if tok[i] == "\\" and tok[i + 1 : i + 2] == "0":
            out.append(0); i += 2
        elif tok[i] == "\\" and tok[i + 1 : i + 2] == "x":
            out.append(int(tok[i + 2 : i + 4], 16)); i += 4
        else:
            out += tok[i].encode(); i += 1
    return bytes(out)


def show_bytes(b):
    if not b:
        return '""'
    s = ""
    for c in b:
        if c == 0:
            s += "\\0"
        elif 0x21 <= c <= 0x7E and c != 0x5C:
            s += chr(c)
        else:
            s += "\\x%02x" % c
    return s


def b64(b):
    return base64.b64encode(b).decode()


def unb64(s):
    return base64.b64decode(s or "")


def show_kv(kv):
    return "%s=%s create=%d mod=%d ver=%d lease=%d" % (
        show_bytes(unb64(kv.get("key"))), show_bytes(unb64(kv.get("value"))),
        int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
        int(kv.get("version", 0)), int(kv.get("lease", 0)))


def prefix_end(key):
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class Args:
    def __init__(self, line):
        self.words = line.split()

    def pos(self, i):
        return [w for w in self.words if "=" not in w or w.startswith("=")][i]

    def flag(self, n):
        return n in self.words

    def opt(self, n):
        for w in self.words:
            if w.startswith(n + "="):
                return w[len(n) + 1 :]
        return None

    def num(self, n):
        v = self.opt(n)
        return int(v) if v is not None else 0

    def range_end(self, key):
        if self.opt("end") is not None:
            return parse_bytes(self.opt("end"))
        if self.flag("prefix"):
            return prefix_end(key)
        if self.flag("from_key"):
            return b"\0"
        return b""


def parse_op(line):
    a = Args(line)
    key = parse_bytes(a.pos(1))
    head = a.pos(0)
    if head == "put":
        return "request_put", {"key": b64(key), "value": b64(parse_bytes(a.pos(2))),
                               "lease": a.num("lease"), "prev_kv": a.flag("prev_kv"),
                               "ignore_value": a.flag("ignore_value"),
                               "ignore_lease": a.flag("ignore_lease")}
    if head == "get":
        req = {"key": b64(key), "range_end": b64(a.range_end(key)), "limit": a.num("limit"),
               "revision": a.num("rev"), "keys_only": a.flag("keys_only"),
               "count_only": a.flag("count_only"), "min_mod_revision": a.num("min_mod"),
               "max_mod_revision": a.num("max_mod"), "min_create_revision": a.num("min_create"),
               "max_create_revision": a.num("max_create")}
        s = a.opt("sort")
        if s:
            t, _, o = s.partition(":")
            req["sort_target"] = t.upper()
            req["sort_order"] = {"asc": "ASCEND", "desc": "DESCEND", "none": "NONE", "": "ASCEND"}[o]
        return "request_range", req
    if head == "del":
        return "request_delete_range", {"key": b64(key), "range_end": b64(a.range_end(key)),
                                        "prev_kv": a.flag("prev_kv")}
    raise ValueError(line)


def indent_of(line):
    return len(line) - len(line.lstrip())


def parse_txn(lines):
    t = {"compare": [], "success": [], "failure": []}
    i = 0
    while i < len(lines):
        line, ind = lines[i].strip(), indent_of(lines[i])
        i += 1
        head, _, rest = line.partition(" ")
        if head == "if":
            a = Args(rest)
            key = parse_bytes(a.pos(1))
            target, arg = a.pos(0), a.pos(3)
            c = {"key": b64(key), "range_end": b64(a.range_end(key)),
                 "result": {"=": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}[a.pos(2)],
                 "target": target.upper()}
            field = {"value": "value", "version": "version", "create": "create_revision",
                     "mod": "mod_revision", "lease": "lease"}[target]
            c[field] = b64(parse_bytes(arg)) if target == "value" else int(arg)
            t["compare"].append(c)
        else:
            if rest.strip() == "txn":
                start = i
                while i < len(lines) and indent_of(lines[i]) > ind:
                    i += 1
                op = {"request_txn": parse_txn(lines[start:i])}
            else:
                kind, req = parse_op(rest)
                op = {kind: req}
            t["success" if head == "then" else "failure"].append(op)
    return t


def call(path, body):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
    conn.request("POST", path, json.dumps(body))
    resp = json.loads(conn.getresponse().read() or b"{}")
    conn.close()
    return resp


def header_rev(resp):
    return int(resp.get("header", {}).get("revision", 0))


def render_range(out, pad, r):
    for kv in r.get("kvs", []):
        out.append(pad + show_kv(kv))


def render_txn(out, pad, t):
    for resp in t.get("responses", []):
        if "response_put" in resp:
            p = resp["response_put"]
            out.append(pad + ("put prev " + show_kv(p["prev_kv"]) if "prev_kv" in p else "put"))
        elif "response_range" in resp:
            r = resp["response_range"]
            out.append("%sget count=%d more=%s" % (pad, int(r.get("count", 0)), str(r.get("more", False)).lower()))
            render_range(out, pad + "  ", r)
        elif "response_delete_range" in resp:
            d = resp["response_delete_range"]
            out.append("%sdel deleted=%d" % (pad, int(d.get("deleted", 0))))
            for kv in d.get("prev_kvs", []):
                out.append(pad + "  prev " + show_kv(kv))
        elif "response_txn" in resp:
            inner = resp["response_txn"]
            out.append("%stxn succeeded=%s" % (pad, str(inner.get("succeeded", False)).lower()))
            render_txn(out, pad + "  ", inner)


def current_rev():
    return header_rev(call("/v3/kv/range", {"key": b64(b"\0")}))


def events(frm, mx):
    cur = current_rev()
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
    body = {"create_request": {"key": b64(b"\0"), "range_end": b64(b"\0"), "start_revision": frm, "prev_kv": True}}
    conn.request("POST", "/v3/watch", json.dumps(body))
    resp = conn.getresponse()
    out, dec, buf = [], json.JSONDecoder(), ""
    want_until = min(cur, frm + mx - 1)
    try:
        while True:
            chunk = resp.read1(65536).decode()
            if not chunk:
                break
            buf += chunk
            done = False
            while buf.strip():
                try:
                    obj, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                res = obj.get("result", {})
                if res.get("canceled"):
                    # The gateway leaves cancel_reason empty for compaction; clients turn
                    # compact_revision into ErrCompacted, as etcdctl prints it.
                    if int(res.get("compact_revision", 0)) > 0:
                        return ["err: etcdserver: mvcc: required revision has been compacted"]
                    return ["err: " + res.get("cancel_reason", "")]
                for e in res.get("events", []):
                    rev = int(e["kv"]["mod_revision"])
                    if rev > want_until:
                        done = True
                        continue
                    prev = show_kv(e["prev_kv"]) if "prev_kv" in e else "none"
                    out.append("%d %s %s prev: %s" % (rev, e.get("type", "PUT"), show_kv(e["kv"]), prev))
                    if rev >= want_until:
                        pass
                if out and int(out[-1].split()[0]) >= want_until:
                    done = True
            if done:
                break
    except (TimeoutError, OSError):
        pass
    conn.close()
    return out


def run(lines):
    a = Args(lines[0])
    head = a.pos(0)
    out = []
    if head == "get":
        _, req = parse_op(lines[0])
        r = call("/v3/kv/range", req)
        if "error" in r:
            return ["err: " + r["error"]]
        out.append("rev=%d count=%d more=%s" % (header_rev(r), int(r.get("count", 0)), str(r.get("more", False)).lower()))
        render_range(out, "", r)
        return out
    if head == "leases":
        ids = sorted(int(l["ID"]) for l in call("/v3/lease/leases", {}).get("leases", []))
        for i in ids:
            t = call("/v3/lease/timetolive", {"ID": i, "keys": True})
            keys = sorted(unb64(k) for k in t.get("keys", []))
            out.append("lease %d ttl=%d keys=[%s]" % (i, int(t.get("grantedTTL", 0)), ",".join(show_bytes(k) for k in keys)))
        return out
    if head == "events":
        mx = int(a.opt("max")) if a.opt("max") else 1000
        return events(int(a.pos(1)), mx)
    if head == "put":
        _, req = parse_op(lines[0])
        r = call("/v3/kv/put", req)
        if "error" in r:
            return ["err: " + r["error"]]
        out.append("rev=%d" % header_rev(r))
        if "prev_kv" in r:
            out.append("prev " + show_kv(r["prev_kv"]))
        return out
    if head == "del":
        _, req = parse_op(lines[0])
        r = call("/v3/kv/deleterange", req)
        if "error" in r:
            return ["err: " + r["error"]]
        out.append("rev=%d deleted=%d" % (header_rev(r), int(r.get("deleted", 0))))
        for kv in r.get("prev_kvs", []):
            out.append("prev " + show_kv(kv))
        return out
    if head == "txn":
        r = call("/v3/kv/txn", parse_txn(lines[1:]))
        if "error" in r:
            return ["err: " + r["error"]]
        out.append("rev=%d succeeded=%s" % (header_rev(r), str(r.get("succeeded", False)).lower()))
        render_txn(out, "  ", r)
        return out
    if head == "compact":
        # physical: etcd answers only after the compaction has run, so what later lines read
        # does not depend on how fast its background compactor is (the store compacts at once).
        r = call("/v3/kv/compaction", {"revision": int(a.pos(1)), "physical": True})
        return ["err: " + r["error"]] if "error" in r else ["rev=%d" % header_rev(r)]
    if head == "grant":
        r = call("/v3/lease/grant", {"ID": int(a.pos(1)), "TTL": int(a.pos(2))})
        if "error" in r and "ID" not in r:
            return ["err: " + r["error"]]
        if r.get("error"):
            return ["err: " + r["error"]]
        return ["id=%d ttl=%d" % (int(r["ID"]), int(r["TTL"]))]
    if head == "revoke":
        r = call("/v3/lease/revoke", {"ID": int(a.pos(1))})
        return ["err: " + r["error"]] if "error" in r else ["rev=%d" % header_rev(r)]
    raise ValueError(lines[0])


def replay(text):
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") or not line.strip():
            out.append(line); i += 1; continue
        if line.startswith(">"):
            i += 1; continue
        start = i
        i += 1
        while i < len(lines) and lines[i].startswith(" "):
            i += 1
        out += lines[start:i]
        out += ["> " + l for l in run(lines[start:i])]
    return "\n".join(out) + "\n"


def main():
    bad = 0
    for path in sys.argv[1:]:
        d = tempfile.mkdtemp()
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", d, "--listen-client-urls", "http://127.0.0.1:%d" % PORT,
             "--advertise-client-urls", "http://127.0.0.1:%d" % PORT,
             "--listen-peer-urls", "http://127.0.0.1:%d" % (PORT + 1),
             # Commit every backend write at once. etcd's reads see only committed bolt
             # transactions plus buffered puts, not buffered deletes, so without this a read
             # within its 100 ms batch interval after a compaction still sees the tombstones
             # that the compaction removed (CI saw one replayed by a watch).
             "--backend-batch-limit", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    call("/v3/kv/range", {"key": b64(b"a")}); break
                except OSError:
                    time.sleep(0.1)
            text = open(path).read()
            actual = replay(text)
        finally:
            etcd.kill(); etcd.wait(); shutil.rmtree(d, ignore_errors=True)
        diff = list(difflib.unified_diff(text.splitlines(), actual.splitlines(), path, "etcd", lineterm=""))
        print("%s: %s" % (path, "identical to etcd" if not diff else "DIFFERS"))
        for l in diff:
            print(l)
        bad += bool(diff)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
